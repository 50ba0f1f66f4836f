"""`nexus`: run a bundle's capabilities from the shell, or describe a bundle.

    nexus run --bundle DIR text.generate "Once upon a time"
    nexus run --bundle DIR text.embed "a passage to index"
    nexus run --bundle DIR vision.classify photo.png
    nexus run --bundle DIR audio.speaker_embed voice.wav
    nexus run --bundle DIR audio.transcribe voice.wav
    nexus run --bundle DIR auto "Write a poem about the sea"     # the router picks the capability
    nexus info --bundle DIR [--verify] [--json]

Arrays are printed as JSON lists; class lists as "label<TAB>prob" lines. Errors (bad input, bad option,
routing, unreadable file, hash mismatch) go to stderr as one line with exit status 2; any other failure
is one line naming the input with exit status 1, never a traceback (NEXUS_DEBUG=1 re-raises it).
Teacher-free: imports the runtime only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import numpy as np

from .inputs import MAX_NEW_TOKENS, MAX_TOP_K, InputWarning, describe


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other nexus error."""

    def error(self, message: str):
        self.exit(2, f"nexus: error: {message} (see {self.prog} --help)\n")


def _bounded(name: str, hi: int):
    """An argparse type: an int in [1, hi]. `--top-k -1` used to crash, `--max-new-tokens 0` to echo."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not an integer") from None
        if not 1 <= v <= hi:
            raise argparse.ArgumentTypeError(f"{name}: must be between 1 and {hi}, got {v}")
        return v
    return parse


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nexus", description="Run a NEXUS student bundle (teacher-free).")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run one capability on one input")
    r.add_argument("--bundle", required=True, help="bundle folder (with manifest.json)")
    r.add_argument("capability", help="e.g. text.generate, vision.classify, or auto")
    r.add_argument("input", help="text, or a path to an image / WAV file")
    r.add_argument("--max-new-tokens", type=_bounded("--max-new-tokens", MAX_NEW_TOKENS), default=32,
                   help=f"text.generate: tokens to generate (1-{MAX_NEW_TOKENS})")
    r.add_argument("--top-k", type=_bounded("--top-k", MAX_TOP_K), default=5,
                   help=f"vision.classify: classes to print (1-{MAX_TOP_K})")
    r.add_argument("--int8-compute", choices=["dequantize", "dynamic"], default="dequantize",
                   help="int8 bundles: dequantize to fp32 (default) or torch dynamic int8 matmuls (a tower whose "
                        "outputs would change by > 10%% runs dequantized, with a warning)")
    i = sub.add_parser("info", help="towers, sizes, quantization, retention, verified")
    i.add_argument("--bundle", required=True)
    i.add_argument("--verify", action="store_true", help="also check the sha256 of every file now")
    i.add_argument("--json", action="store_true", help="print the info as JSON")
    return p


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _info(args) -> int:
    from .bundle import Bundle

    b = Bundle.load(args.bundle)
    info = b.info()
    if args.verify:
        info["files_checked"] = b.verify_all()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    q = info["quantization"] or {}
    print(f"bundle     {info['path']}")
    print(f"verified   {info['verified']}" + ("" if info["verified"] else "  (failed or unmeasured contracts; see manifest)"))
    print(f"quantized  {q.get('scheme')}  (load: {q.get('load')})")
    print(f"created    {info['created']}  torch {info['versions'].get('torch')}")
    if args.verify:
        print(f"files      sha256 ok ({len(b.manifest['files'])} files)")
    print("\ntower    modality  params      bytes(fp32)  bytes(bundle)  capabilities")
    for name, t in info["towers"].items():
        print(f"{name:<8} {t['modality']:<9} {t.get('parameters') or 0:>10,}  {t.get('bytes_fp32') or 0:>11,}  "
              f"{t['bytes']:>13,}  {', '.join(t['capabilities'])}")
    print("\ncapability            metric                  min   before(heldout)  after(heldout)  ood(after)  tier")
    for cap, r in info["retention"].items():
        def get(stage, split):
            s = (r.get(stage) or {}).get("splits", {}).get(split) or {}
            return s.get("retention")
        print(f"{cap:<21} {r['metric']:<23} {r['min_retention']:<5} {_fmt(get('before_quantization', 'heldout')):>15}  "
              f"{_fmt(get('after_quantization', 'heldout')):>14}  {_fmt(get('after_quantization', 'ood')):>10}  {r['tier']}")
    return 0


def _run(args) -> int:
    from .bundle import Bundle

    b = Bundle.load(args.bundle, int8_compute=args.int8_compute)
    kwargs = {}
    route = b.route(args.capability, args.input)
    if route.capability == "text.generate":
        kwargs["max_new_tokens"] = args.max_new_tokens
    elif route.capability == "vision.classify":
        kwargs["top_k"] = args.top_k
    out = b.run(route.capability, args.input, **kwargs)
    if isinstance(out, np.ndarray):
        print(json.dumps(np.round(out.astype(float), 6).tolist()))
    elif isinstance(out, list):
        for label, prob in out:
            print(f"{label}\t{prob:.4f}")
    else:
        print(out)
    return 0


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 500 else text[:500] + "..."


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Input warnings (audio cut to max_frames) and the int8 fallback as one `nexus: warning:` line; others
    as Python prints them."""
    from .bundle import Int8FallbackWarning

    if issubclass(category, (InputWarning, Int8FallbackWarning)):
        print(f"nexus: warning: {_one_line(message)}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .bundle import BundleError, RoutingError
    from .inputs import InputError

    warnings.simplefilter("always", InputWarning)  # shown even under PYTHONWARNINGS=ignore: output changed
    warnings.showwarning = _show_warning
    what = f"bundle {args.bundle!r}" if args.cmd == "info" else \
        f"{args.capability} on input {describe(args.input)} (bundle {args.bundle!r})"
    try:
        return _info(args) if args.cmd == "info" else _run(args)
    except (BundleError, RoutingError, InputError) as e:
        print(f"nexus: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nexus: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence: no traceback for users
        if os.environ.get("NEXUS_DEBUG") == "1":
            raise
        print(f"nexus: error: {what} failed: {type(e).__name__}: {_one_line(e)} "
              "(NEXUS_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
