"""The target's own compiler on a host without its chips: device descriptions of a TPU slice (libtpu)
or a GPU cluster (the CUDA compiler of jaxlib's GPU plugin) for `jax.jit(...).lower(...).compile()`.

TPU: libtpu compiles for any v5p/v6e/v5e slice from a CPU host once it knows not to look for one.
`tools/bootstrap.sh --tpu` (and `--test`) installs it beside the environment (`<venv>/tpu-compiler`),
not into site-packages, so that jax does not start a TPU backend (and print its warnings) in every
other command on a host without TPUs; preflight puts that folder on sys.path when it needs it. A
libtpu in site-packages (`pip install -e ".[tpu]"`, as on a TPU VM) works as well.
`prepare_libtpu` sets the variables libtpu reads when it loads (each only where the user has not):
no query of the Cloud metadata server (otherwise ~2 minutes of retries on a host outside Google
Cloud), an accelerator type and a worker list (otherwise a wall of "could not determine" warnings),
no exclusive lockfile, and quiet logs. They must be set before the first `get_topology_desc`; later calls reuse the
loaded libtpu, which compiles for any topology regardless of the type named here.

GPU: `get_topology_desc(platform="cuda", topology="S x H x G")` describes S slices of H hosts with G
GPUs each. Without `target_config` the attached GPU's description is used (so an H200 machine
compiles for NxH200); other models need a GpuTargetConfig text proto (`gpu_target_configs/`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sys
from pathlib import Path

from gemma_qat.preflight.topologies import Topology

TARGET_CONFIGS = Path(__file__).parent / "gpu_target_configs"
LIBTPU_DIR = Path(sys.prefix) / "tpu-compiler"  # where tools/bootstrap.sh installs libtpu


class CompilerUnavailable(RuntimeError):
    """The target's compiler is not on this host (the message says how to get it)."""


def expected_libtpu() -> str | None:
    """The libtpu version spec the installed jax's `tpu` extra pins (e.g. '==0.0.42.*')."""
    for req in importlib.metadata.requires("jax") or ():
        m = re.match(r"libtpu\s*([=<>!~][^;]*);\s*extra\s*==\s*['\"]tpu['\"]", req)
        if m:
            return m.group(1).strip()
    return None


def _find_libtpu() -> None:
    """Makes a libtpu installed in LIBTPU_DIR importable (jax loads it as the `libtpu` package)."""
    if importlib.util.find_spec("libtpu") is None and (LIBTPU_DIR / "libtpu").is_dir():
        sys.path.insert(0, str(LIBTPU_DIR))
        importlib.invalidate_caches()


def libtpu_available() -> bool:
    _find_libtpu()
    return importlib.util.find_spec("libtpu") is not None


def libtpu_version() -> str | None:
    _find_libtpu()
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return None


def _matches(version: str, spec: str) -> bool:
    if spec.startswith("=="):
        want = spec[2:].strip()
        return version.startswith(want[:-1]) if want.endswith("*") else version == want
    return True  # a range: jax's own import check speaks if it matters


def check_libtpu() -> str:
    """'libtpu X' when it is installed and is the version jax expects; CompilerUnavailable otherwise."""
    import jax
    spec, version = expected_libtpu(), libtpu_version()
    fix = f'run `bash tools/bootstrap.sh --tpu` (or pip install "libtpu{spec or ""}")'
    if version is None:
        raise CompilerUnavailable(f"libtpu is not installed, so the TPU compiler is not here; {fix}")
    if spec and not _matches(version, spec):
        raise CompilerUnavailable(f"libtpu {version} does not match jax {jax.__version__}, which expects "
                                  f"libtpu{spec}; {fix}")
    return f"libtpu {version}"


def prepare_libtpu(topo: Topology) -> None:
    """Environment for a deviceless TPU compile (see module doc); leaves anything already set."""
    _find_libtpu()
    defaults = {
        "TPU_SKIP_MDS_QUERY": "1",
        "TPU_ACCELERATOR_TYPE": topo.name,
        "TPU_WORKER_HOSTNAMES": "localhost",
        "TPU_WORKER_ID": "0",
        # libtpu takes /tmp/libtpu_lockfile to guard real chips; a deviceless compile touches none, and
        # parallel preflights (or test workers) would otherwise fail with "multi-process lockfile".
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
        "TPU_STDERR_LOG_LEVEL": "3",
        "TPU_MIN_LOG_LEVEL": "3",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)


def tpu_devices(topo: Topology) -> list:
    """The slice's devices from libtpu's topology (no TPU needed)."""
    check_libtpu()
    prepare_libtpu(topo)
    from jax.experimental import topologies as jtopo
    return list(jtopo.get_topology_desc(platform="tpu", **topo.tpu_topology_kwargs()).devices)


def gpu_target_config(topo: Topology) -> str | None:
    """The GpuTargetConfig text for the topology's GPU model, or None to use the attached GPU's."""
    import jax
    try:
        attached = {d.device_kind for d in jax.devices("cuda")}
    except RuntimeError:
        attached = set()
    if any(topo.chip.name in kind for kind in attached):
        return None
    path = TARGET_CONFIGS / f"{topo.chip.name.lower()}.txtpb"
    if not path.is_file():
        raise CompilerUnavailable(f"no GPU target description for {topo.chip.name} ({path} is missing) and no "
                                  f"{topo.chip.name} attached")
    return path.read_text()


def gpu_devices(topo: Topology) -> list:
    """The cluster's devices from the CUDA plugin's topology; needs jaxlib's CUDA plugin (a GPU host)."""
    import jax
    try:
        jax.devices("cuda")
    except RuntimeError as e:
        raise CompilerUnavailable(f"the GPU compiler needs jax's CUDA plugin and a CUDA driver "
                                  f"({str(e).splitlines()[0][:120]}); run this on a GPU host") from None
    from jax.experimental import topologies as jtopo
    kwargs = {"topology": f"1x{topo.hosts}x{topo.chips_per_host}"}
    config = gpu_target_config(topo)
    if config is not None:
        kwargs["target_config"] = config
    return list(jtopo.get_topology_desc(topo.name, "cuda", **kwargs).devices)


def target_devices(topo: Topology) -> list:
    """Devices of the target topology for its own compiler; CompilerUnavailable if it is not here."""
    return tpu_devices(topo) if topo.platform == "tpu" else gpu_devices(topo)
