from difflineage.machine import cpu_description, machine_description


def test_a_cpu_is_named_with_its_generation_and_vector_unit():
    zen3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n" \
           "flags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nmodel name\t: other\n"
    zen4 = zen3.replace("model\t\t: 1", "model\t\t: 17").replace("avx2 fma", "avx2 fma avx512f avx512_bf16")
    xeon = "cpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Intel(R) Xeon(R) Platinum\nflags\t: avx2 avx512f amx_bf16\n"
    assert cpu_description(zen3) == "AMD EPYC (family 25 model 1, AVX2)"
    assert cpu_description(zen4) == "AMD EPYC (family 25 model 17, AVX-512 BF16)"  # the same name, told apart
    assert cpu_description(xeon) == "Intel(R) Xeon(R) Platinum (family 6 model 143, AMX)"
    assert cpu_description("", "arm64") == "arm64"


def test_the_machine_is_named_in_one_line_with_torch():
    import torch

    line = machine_description()
    assert "\n" not in line and f"torch {torch.__version__}" in line
