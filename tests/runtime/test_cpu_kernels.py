import platform

import pytest

from ane_build.runtime import cpu_kernels

# /proc/cpuinfo of real CPUs, their first processor (the flags lines cut to a sample of their words).
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c rdrand avx2 bmi2 avx512f avx512dq avx512cd \
avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vnni avx512_bitalg avx512_fp16 amx_bf16 amx_tile amx_int8
bogomips\t: 4000.00

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
"""
EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 avx512f avx512dq avx512_bf16 avx512_vnni
"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc \
dcpop sha3 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd40
CPU revision\t: 1
"""
CORTEX_A72 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd08
"""
# sysctl hw.optional.arm machdep.cpu.brand_string on an M2 Mac (a sample of the FEAT_ keys).
APPLE_M2 = """hw.optional.arm.FEAT_FlagM: 1
hw.optional.arm.FEAT_FP16: 1
hw.optional.arm.FEAT_DotProd: 1
hw.optional.arm.FEAT_I8MM: 1
hw.optional.arm.FEAT_BF16: 1
hw.optional.arm.FEAT_SME: 0
machdep.cpu.brand_string: Apple M2
"""


@pytest.mark.parametrize("text, cpu, isa", [
    (SAPPHIRE_RAPIDS, "Intel(R) Xeon(R) Platinum 8480+",
     ["avx2", "f16c", "fma", "avx512f", "avx512_fp16", "avx512_bf16", "amx_tile", "amx_bf16"]),
    (EPYC, "AMD EPYC 9R14", ["avx2", "f16c", "fma", "avx512f", "avx512_bf16"]),
    (GRAVITON3, "CPU implementer 0x41 CPU part 0xd40", ["fphp", "asimdhp", "asimddp", "i8mm", "bf16", "sve"]),
    (CORTEX_A72, "CPU implementer 0x41 CPU part 0xd08", []),
], ids=["sapphire-rapids", "epyc", "graviton3", "cortex-a72"])
def test_cpuinfo_gives_the_name_and_the_features_that_choose_kernels(text, cpu, isa):
    assert cpu_kernels.parse_cpuinfo(text) == (cpu, isa)


def test_sysctl_gives_the_name_and_the_features_turned_on():
    assert cpu_kernels.parse_sysctl(APPLE_M2) == ("Apple M2", ["FEAT_FP16", "FEAT_DotProd", "FEAT_I8MM", "FEAT_BF16"])


@pytest.mark.parametrize("isa, expected", [
    (cpu_kernels.parse_cpuinfo(SAPPHIRE_RAPIDS)[1],
     "native fp16 (AVX512-FP16 kernels: fp16 products and accumulation)"),
    (cpu_kernels.parse_cpuinfo(EPYC)[1], "fp32 (fp16 storage, F16C conversion)"),
    (cpu_kernels.parse_cpuinfo(GRAVITON3)[1],
     "native fp16 (ARMv8.2 FP16 arithmetic kernels: fp16 products and accumulation)"),
    (cpu_kernels.parse_sysctl(APPLE_M2)[1],
     "native fp16 (ARMv8.2 FP16 arithmetic kernels: fp16 products and accumulation)"),
    (cpu_kernels.parse_cpuinfo(CORTEX_A72)[1], "unknown (XNNPACK has no fp16 kernels for the features found)"),
], ids=["sapphire-rapids", "epyc", "graviton3", "apple-m2", "cortex-a72"])
def test_an_fp16_twin_computes_as_xnnpack_chooses_for_the_cpu(isa, expected):
    assert cpu_kernels.arithmetic("fp16", isa) == expected
    assert cpu_kernels.arithmetic("fp32", isa) == "fp32"


@pytest.mark.skipif(not cpu_kernels.CPUINFO.exists(), reason="no /proc/cpuinfo: not Linux")
def test_the_report_reads_this_machines_cpuinfo_and_says_it_is_inferred():
    cpu, isa = cpu_kernels.parse_cpuinfo(cpu_kernels.CPUINFO.read_text())
    report = cpu_kernels.twin_arithmetic("fp16")
    assert report == {"cpu": cpu, "machine": platform.machine(), "isa": isa,
                      "arithmetic": cpu_kernels.arithmetic("fp16", isa), "source": report["source"]}
    assert report["source"].startswith("inferred from the CPU's features (/proc/cpuinfo)")
    assert "the runtime does not report its kernels" in report["source"]
