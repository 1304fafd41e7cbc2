"""preflight/hlo.py reads a compiled module whose custom call carries a backend_config over several lines
(a Pallas TPU kernel's does): the instructions after it stay in their computation."""

from gemma_qat.preflight import hlo

TEXT = """HloModule m, entry_computation_layout={(f32[8]{0})->f32[16]{0}}

ENTRY %main (x: f32[8]) -> f32[16] {
  %x = f32[8]{0} parameter(0)
  %k = f32[8]{0} custom-call(%x), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"body": "abc",
"xprof_metadata":"{\\"block_q\\": 512}"
}}, metadata={op_name="jit(f)/splash"}
  %ag = f32[16]{0} all-gather(%k), replica_groups={{0,1}}, dimensions={0}
  ROOT %n = f32[16]{0} negate(%ag)
}
"""


def test_a_multi_line_backend_config_does_not_end_the_computation():
    m = hlo.parse(TEXT)
    names = [i.name for i in m.computations[m.entry].instructions]
    assert names == ["x", "k", "ag", "n"]
    k = m.computations[m.entry].instructions[1]
    assert k.opcode == "custom-call" and 'op_name="jit(f)/splash"' in k.attrs


def _chain(depth: int, backend_config: str = "") -> str:
    comps = [f"%c{depth} (p: f32[8]) -> f32[8] {{\n  %p = f32[8]{{0}} parameter(0)\n"
             f"  ROOT %r = f32[8]{{0}} negate(%p){backend_config}\n}}\n"]
    comps += [f"%c{i} (p: f32[8]) -> f32[8] {{\n  %p = f32[8]{{0}} parameter(0)\n"
              f"  ROOT %r = f32[8]{{0}} call(%p), to_apply=%c{i + 1}\n}}\n" for i in range(depth)]
    entry = ("ENTRY %main (x: f32[8]) -> f32[8] {\n  %x = f32[8]{0} parameter(0)\n"
             "  ROOT %r = f32[8]{0} call(%x), to_apply=%c0\n}\n")
    return "HloModule m\n\n" + "\n".join(comps) + "\n" + entry


def test_a_deep_call_chain_is_walked_without_recursion():
    runs = hlo.parse(_chain(3000)).runs()
    assert runs["c3000"] == (1, ()) and runs["c0"] == (1, ())


def test_a_name_inside_a_backend_config_is_not_a_call():
    # A kernel's config text naming a computation (here the one that calls it) must not make a cycle.
    m = hlo.parse(_chain(2, ', backend_config={"kernel": {"body=%c0": 1, "x": "to_apply=%c1"}}'))
    assert m.computations["c2"].instructions[-1].called() == {}
    assert m.runs()["c2"] == (1, ())
