"""Which arithmetic the CPU twin's XNNPACK kernels compute in on this machine, for the smoke report.

Smoke numbers are compared across machines, and an fp16 twin's logits depend on the CPU. XNNPACK
picks its fp16 matrix kernels by the CPU's features (its src/configs/gemm-config.c): on x86 with
AVX512-FP16 and on arm64 with FP16 arithmetic (Linux ``asimdhp``, macOS ``FEAT_FP16``) native fp16
kernels, which multiply and accumulate in fp16; on other x86 CPUs with AVX2 kernels that load and
store fp16 and compute in fp32 (F16C conversions). fp32 programs compute in fp32 everywhere.

The runtime does not report which microkernels it chose: this infers them from the CPU's
features by that rule, and says so in the report.
"""

import platform
import subprocess
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# The features that decide, or explain, XNNPACK's choice, as the OS names them.
X86_FLAGS = ("avx2", "f16c", "fma", "avx512f", "avx512_fp16", "avx512_bf16", "amx_tile", "amx_bf16", "amx_fp16")
ARM_FEATURES = ("fphp", "asimdhp", "asimddp", "i8mm", "bf16", "sve")
MACOS_FEATURES = ("FEAT_FP16", "FEAT_DotProd", "FEAT_I8MM", "FEAT_BF16", "FEAT_SME")  # sysctl hw.optional.arm.*
NATIVE_FP16 = {"avx512_fp16": "AVX512-FP16", "asimdhp": "ARMv8.2 FP16 arithmetic",
               "FEAT_FP16": "ARMv8.2 FP16 arithmetic"}


def twin_arithmetic(program_dtype):
    """What computed a ``program_dtype`` ("fp16" or "fp32") twin on this machine, as smoke.json records it."""
    cpu, isa, where = read_cpu()
    return {"cpu": cpu, "machine": platform.machine(), "isa": isa, "arithmetic": arithmetic(program_dtype, isa),
            "source": f"inferred from the CPU's features ({where}) by XNNPACK's kernel selection rule; the "
                      "runtime does not report its kernels"}


def arithmetic(program_dtype, isa):
    """The arithmetic XNNPACK computes a ``program_dtype`` program in, on a CPU with features ``isa``."""
    if program_dtype == "fp32":
        return "fp32"
    native = [NATIVE_FP16[feature] for feature in isa if feature in NATIVE_FP16]
    if native:
        return f"native fp16 ({native[0]} kernels: fp16 products and accumulation)"
    if {"avx2", "f16c"} <= set(isa):
        return "fp32 (fp16 storage, F16C conversion)"
    return "unknown (XNNPACK has no fp16 kernels for the features found)"


def read_cpu():
    """(cpu name, its features of interest, where they were read) on this machine."""
    if CPUINFO.exists():
        return (*parse_cpuinfo(CPUINFO.read_text()), str(CPUINFO))
    if platform.system() == "Darwin":
        done = subprocess.run(["sysctl", "hw.optional.arm", "machdep.cpu.brand_string"], capture_output=True,
                              text=True, check=False)
        return (*parse_sysctl(done.stdout), "sysctl")
    return platform.processor(), [], "none found"


def parse_cpuinfo(text):
    """(cpu name, features of interest) from the text of Linux's /proc/cpuinfo, x86 or arm64."""
    fields = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields.setdefault(key.strip(), value.strip())  # every processor is alike: the first one's
    features = set((fields.get("flags") or fields.get("Features") or "").split())
    # arm64 kernels name no model: the implementer and part numbers identify the core.
    name = fields.get("model name") or " ".join(f"{key} {fields[key]}" for key in ("CPU implementer", "CPU part")
                                                if key in fields)
    return name, [feature for feature in (*X86_FLAGS, *ARM_FEATURES) if feature in features]


def parse_sysctl(text):
    """(cpu name, features of interest) from ``sysctl hw.optional.arm machdep.cpu.brand_string`` on macOS."""
    fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    enabled = {key.rsplit(".", 1)[-1] for key, value in fields.items() if value.strip() == "1"}
    return fields.get("machdep.cpu.brand_string", "").strip(), [f for f in MACOS_FEATURES if f in enabled]
