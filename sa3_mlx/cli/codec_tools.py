"""``sa3 encode-audio IN --out LATENTS.npy`` and ``sa3 decode-latents LATENTS.npy --out OUT.wav``: the codec
on its own. Parsing only; the work is :mod:`sa3_mlx.latents` and the pipeline's codec."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import hub, output
from ..arguments import Parser, UsageError
from ..audio import FORMATS, SAMPLE_RATE
from ..settings import DTYPES


def _codec_arguments(p: Parser, role: str) -> None:
    g = p.add_argument_group("codec")
    g.add_argument("--decoder", choices=tuple(hub.CODECS),
                   help=f"the codec whose {role} runs (default: --dit's own, else same-s); name it as generation "
                        "does: the codec's two halves share the name")
    g.add_argument("--dit", choices=tuple(hub.MODELS), help="use this generator's own codec (same-s for the small "
                                                             "models, same-l for medium)")
    g.add_argument("--model", metavar="REPO_OR_PATH", dest="release",
                   help="an original release (Hugging Face repo or local folder): its own codec")
    g.add_argument("--codec-dtype", choices=DTYPES, help="codec precision (default fp32; fp16 for SAME-L on a GPU)")
    g.add_argument("--weights-dir", type=Path, metavar="DIR", help="local folder with the weight files (flat or with MLX/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _pipeline(args):
    from ..pipeline import Pipeline, dtype_of

    if args.weights_dir is not None and not args.weights_dir.is_dir():
        raise UsageError(f"--weights-dir {args.weights_dir}: no such folder")
    if args.release is not None:
        if args.decoder is not None or args.dit is not None:
            raise UsageError("--model brings its own codec; leave out --decoder and --dit")
        return Pipeline(args.release, weights_dir=args.weights_dir, codec_dtype=dtype_of(args.codec_dtype),
                        progress=sys.stderr.isatty())
    codec_name = args.decoder or (hub.MODELS[args.dit].codec if args.dit else "same-s")
    model = args.dit or next(m for m, spec in hub.MODELS.items() if spec.codec == codec_name)
    return Pipeline(model, codec_name, weights_dir=args.weights_dir, codec_dtype=dtype_of(args.codec_dtype),
                    progress=sys.stderr.isatty())


def encode_audio(argv: list[str]) -> int:
    p = Parser(prog="sa3 encode-audio", description="Encode an audio file to codec latents ([256, T] float32 .npy, "
               "one latent per 4096 samples at 44.1 kHz), as generation's audio input is encoded.")
    p.add_argument("input", metavar="IN", type=Path, help="audio file: any format libsndfile reads, any rate, "
                                                          "mono or stereo (resampled to 44.1 kHz stereo)")
    p.add_argument("--out", type=Path, required=True, metavar="LATENTS.npy", help="where the latents go (.npy)")
    _codec_arguments(p, "encoder")
    args = p.parse_args(argv)
    if args.out.suffix.lower() != ".npy":
        raise UsageError(f"--out {args.out}: latents are written as .npy; end the name in .npy")
    from ..latents import encode_file

    path, latents, samples = encode_file(_pipeline(args), args.input, args.out, args.overwrite)
    print(f"{path}  [{latents.shape[0]}, {latents.shape[1]}] latents of {samples / SAMPLE_RATE:.3f} s "
          f"({samples} samples)", file=sys.stderr)
    print(path)
    return 0


def decode_latents(argv: list[str]) -> int:
    p = Parser(prog="sa3 decode-latents", description="Decode codec latents (a [256, T] .npy, as sa3 encode-audio "
               "writes) to audio with the exact chunked decode of a generation.")
    p.add_argument("input", metavar="LATENTS.npy", type=Path)
    p.add_argument("--out", type=Path, required=True, metavar="OUT",
                   help="audio file; its suffix picks the format unless --format is given")
    p.add_argument("--format", choices=tuple(FORMATS), help="output format (default: from --out, else wav16)")
    p.add_argument("--seconds", type=float, metavar="S",
                   help="trim to S seconds (default: all 4096 T samples; give the length encode-audio printed "
                        "to get the input's length back)")
    _codec_arguments(p, "decoder")
    args = p.parse_args(argv)
    fmt = output.resolve_format(args.format, args.out, folder=Path("."))
    out = args.out if args.out.suffix else args.out.with_name(args.out.name + FORMATS[fmt][2])
    from ..latents import decode_file

    path, audio, levels, warnings = decode_file(_pipeline(args), args.input, out, fmt, args.seconds, args.overwrite)
    for warning in warnings:
        print("warning: " + warning, file=sys.stderr)
    print(f"{path}  {audio.shape[1] / SAMPLE_RATE:.3f} s, peak {levels['peak_dbfs']} dBFS", file=sys.stderr)
    print(path)
    return 0
