"""The profile summariser used by benchmarks/bench_step.py --profile: kernels on the GPU stream lines
only (the "XLA Ops" line repeats them), classes by kernel name, sources from the HLO's op_name."""

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from trace_summary import hlo_sources, source_label, summarise  # noqa: E402

HLO = '''
  %loop_add_fusion.6 = f32[8]{0} fusion(%p), kind=kLoop, calls=%c, metadata={op_name="jit(step)/jit(main)/add"}
  ROOT %gemm_fusion_dot.3 = bf16[4,4]{1,0} fusion(%a, %b), kind=kCustom, metadata={op_name="jit(step)/transpose(jvp(Transformer))/layer_7/mlp/linear/dot_general" source_file="x.py"}
'''


def test_summary_counts_stream_kernels_once_and_maps_sources(tmp_path):
    meta = lambda ph_name, pid, tid, name: {"ph": "M", "name": ph_name, "pid": pid, "tid": tid, "args": {"name": name}}
    ev = lambda pid, tid, name, dur, **args: {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": 0, "dur": dur,
                                             "args": args}
    events = [meta("process_name", 1, 0, "/device:GPU:0"), meta("process_name", 2, 0, "/host:CPU"),
              meta("thread_name", 1, 10, "Stream #13(Compute)"), meta("thread_name", 1, 11, "XLA Ops"),
              ev(1, 10, "loop_add_fusion_6", 3000.0), ev(1, 10, "gemm_fusion_dot_3", 5000.0),
              ev(1, 10, "nvjet_sm90_tst_256x128", 2000.0, hlo_op="gemm_fusion_dot.3"),
              ev(1, 11, "loop_add_fusion.6", 3000.0),  # the XLA Ops line: not counted again
              ev(2, 5, "python_frame", 99999.0)]  # host: not counted
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    text = summarise(str(tmp_path), steps=2, hlo_text=HLO)
    assert text.splitlines()[0].startswith("GPU kernel time per step: 5.0 ms over 3 kernel launches")
    rows = {" ".join(line.split()[:-3]): float(line.split()[-3]) for line in text.splitlines()[1:3]}
    assert rows == {"gemm (cuBLAS/cutlass)": 3.5, "elementwise fusion": 1.5}
    assert "3.50 ms  bwd layer_*/mlp/linear/dot_general" in text and "1.50 ms  fwd step/add" in text


def test_source_label():
    assert hlo_sources(HLO)["loop_add_fusion_6"] == "jit(step)/jit(main)/add"
    assert source_label(None) == "(unmapped)"
