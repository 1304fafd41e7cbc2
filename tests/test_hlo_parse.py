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
