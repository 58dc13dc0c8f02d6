"""The `export` and `slice` commands: an HF folder or an elastic training run (orbax) in, an HF
NemotronH folder out (optionally sliced to `--widths` / a trained `--budget`, optionally in the
ModelOpt FP8 / NVFP4 layout)."""
from __future__ import annotations

import os
from typing import Any

import jax

from . import quant
from .config import NemotronHConfig
from .elastic import slice_quant_state
from .elastic.budgets import budget_family, check_budget_size, target_of, trained_widths
from .elastic.slicing import param_count, slice_params
from .fileio import check_target
from .finite import check_finite
from .hf import HF_EXPORT_FILES, checkpoint_bytes, load_hf, parse_widths, read_budget_table, save_hf
from .model.kinds import attention
from .quant import calibrate_kv_cache
from .train.checkpoint import load_run


def _load_source(src: str, args) -> tuple[NemotronHConfig, dict, Any]:
    """HF directory or elastic-training (orbax) run -> (cfg, params, widths from --budget or None)."""
    if os.path.isfile(os.path.join(src, "config.json")):
        if getattr(args, "budget", None) is not None:
            raise ValueError("--budget needs an elastic training run (orbax checkpoint with a router); "
                             f"{src} is an HF directory: pass --widths instead")
        cfg, params, args.src_quant = load_hf(src, progress=not args.quiet, with_quant=True,
                                              allow_nonfinite=args.allow_nonfinite)
        args.family = {n: e["widths"] for n, e in read_budget_table(src, cfg).items()}
        return cfg, params, None
    cfg, params, router, ecfg = load_run(src, args.step)
    check_finite({"params": params, "router": router}, f"{src}: the checkpoint", allow=args.allow_nonfinite,
                 hint="refusing to export it (--allow-nonfinite to export anyway)")
    if router is not None and ecfg is not None:   # the run's nested family: every trained budget (100%: the parent)
        args.family = budget_family(router, cfg, ecfg)
        args.family_fractions = {f"{round(100 * b):d}%": b for b in ecfg.budgets}
        args.elastic_cfg = ecfg
    widths = None
    if getattr(args, "budget", None) is not None:
        if router is None or ecfg is None:
            raise ValueError(f"--budget: the run {src} has no trained router (not an elastic run); pass --widths")
        widths = trained_widths(router, cfg, ecfg, args.budget)     # refuses a budget outside the trained range
        got = check_budget_size(cfg, widths, args.budget, target_of(ecfg), ecfg)   # warns on a miss
        if not args.quiet:
            print(f"budget {args.budget}: {widths} ({100 * got:.1f}% of the parent's {target_of(ecfg)})")
    return cfg, params, widths


def _export_quant_state(args, cfg, params, widths):
    """--quantize: the run's own QAD scales when it has them, else weight scales from the parent
    (before slicing) and activation scales calibrated on --calib-batches random-token batches of
    the full and the nested model (PTQ)."""
    if not os.path.isfile(os.path.join(args.src, "config.json")):
        qs = load_run(args.src, args.step, with_quant=True)[4]
        if qs is not None and qs.spec.fmt == args.quantize:
            if not args.quiet:
                print(f"--quantize {args.quantize}: using the run's QAD quantization state")
            return qs
    qs = quant.init_quant_state(params, cfg, quant.recipe_spec(cfg, args.quantize, args.recipe))
    batches = _calib_batches(args, cfg)
    if not args.quiet:
        print(f"--quantize {args.quantize}: PTQ, activation scales from {args.calib_batches} random-token batches")
    return quant.calibrate(params, cfg, qs, batches, widths=(None,) if widths is None else (None, widths))


def _calib_batches(args, cfg):
    key = jax.random.PRNGKey(0)
    return [jax.random.randint(jax.random.fold_in(key, b), (2, 64), 0, cfg.vocab_size)
            for b in range(args.calib_batches)]


def _cmd_export(args) -> int:
    check_target(args.out, owned=HF_EXPORT_FILES, overwrite=args.overwrite, protect=[args.src],
                 what=args.command)                 # refuse a bad target before loading anything
    cfg, params, widths = _load_source(args.src, args)
    if args.widths is not None:
        if widths is not None:
            raise ValueError("give --widths or --budget, not both")
        widths = parse_widths(args.widths, cfg)
    if args.command == "slice" and widths is None:
        raise ValueError("slice needs --widths JSON or --budget B (with an elastic run)")
    n_full = param_count(cfg)
    family = getattr(args, "family", None) or None
    tokenizer = args.tokenizer
    if tokenizer is None and os.path.isfile(os.path.join(args.src, "tokenizer.json")):
        tokenizer = args.src
    qstate, kv_scales = None, None
    src_quant = getattr(args, "src_quant", None)
    if src_quant is not None and args.quantize in (None, src_quant.spec.fmt):
        # a quantized source (one folder per precision): keep its scales; slicing keeps every per-tensor scale
        # and cuts the NVFP4 block scales with their weights (slice_quant_state), nothing is re-derived
        qstate = src_quant
        if not args.quiet:
            print(f"{args.src} is a ModelOpt {src_quant.spec.fmt} checkpoint: its scales are kept")
    elif args.quantize is not None:
        qstate = _export_quant_state(args, cfg, params, widths)
        if args.recipe == "nano" and cfg.layers_of(attention):     # NVIDIA's Nano recipe: FP8 KV-cache scales
            kv_scales = calibrate_kv_cache(params, cfg, _calib_batches(args, cfg), widths=(None,) if widths is None
                                           else (None, widths))
    if widths is not None:
        if qstate is not None:
            qstate = slice_quant_state(qstate, params, cfg, widths)
        if kv_scales:                    # parent layer index -> the slice's
            new = {old: k for k, old in enumerate(i for i, keep in enumerate(widths.layer_mask(cfg)) if keep)}
            kv_scales = {new[i]: v for i, v in kv_scales.items() if i in new}
        cfg, params = slice_params(params, cfg, widths)
        family = None   # the budgets are nested in the parent, not in this slice
    fr = getattr(args, "family_fractions", None) if family else None
    save_hf(args.out, cfg, params, dtype=args.dtype, max_shard_size=args.max_shard_size,
            overwrite=args.overwrite, progress=not args.quiet, quant_state=qstate, kv_scales=kv_scales,
            protect=[args.src], budgets=family, fractions=fr,
            elastic_cfg=getattr(args, "elastic_cfg", None) if family else None, tokenizer_dir=tokenizer,
            allow_nonfinite=args.allow_nonfinite)
    if not args.quiet:
        n = param_count(cfg)
        print(f"wrote {args.out}: {n:,} parameters ({100 * n / n_full:.1f}% of {n_full:,}), pattern {cfg.pattern}, "
              f"hidden {cfg.hidden_size}, {checkpoint_bytes(args.out):,} bytes of safetensors"
              + (f" ({args.quantize})" if args.quantize else ""))
    return 0


def add_cli(subparsers) -> None:
    """Register `export` and `slice` on an argparse subparsers object (handler in `func`)."""
    helps = {
        "export": "convert a checkpoint (HF dir or elastic run) to an HF NemotronH directory, "
                  "optionally sliced (--widths / --budget)",
        "slice": "extract a nested submodel at --widths (or a trained --budget) as an HF NemotronH directory",
    }
    for name, text in helps.items():
        p = subparsers.add_parser(name, help=text, description=text)
        p.add_argument("src", help="HF checkpoint directory (config.json + safetensors) or an elastic training run")
        p.add_argument("out", help="output HF directory (written atomically)")
        p.add_argument("--widths", default=None,
                       help='JSON sizes per axis, e.g. \'{"hidden": 48, "mamba_heads": 4, "ffn": [64, 96]}\'')
        p.add_argument("--budget", type=float, default=None,
                       help="parameter budget (fraction of the parent, e.g. 0.5) answered by the run's router")
        p.add_argument("--step", type=int, default=None, help="checkpoint step of an elastic run (default: latest)")
        p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="on-disk dtype (default: the source's)")
        p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
        p.add_argument("--quantize", default=None, choices=["fp8", "nvfp4"],
                       help="write the ModelOpt FP8 / NVFP4 layout (scales from the parent; a QAD run's own)")
        p.add_argument("--recipe", default="default", choices=["default", "nano"],
                       help="--quantize: 'default' quantizes every projection but lm_head and the MoE router; 'nano' "
                            "matches NVIDIA's Nemotron Nano releases (attention layers and their nearest Mamba layers "
                            "stay BF16, FP8 KV-cache scales calibrated)")
        p.add_argument("--calib-batches", type=int, default=4,
                       help="--quantize without QAD scales: random-token calibration batches (default 4)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace OUT if it holds nothing but a previous export (never a run folder or other files)")
        p.add_argument("--tokenizer", default=None,
                       help="folder whose tokenizer.json / tokenizer_config.json (chat template) are copied into OUT "
                            "(default: SRC's, when it has them)")
        p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
        p.add_argument("--allow-nonfinite", action="store_true",
                       help="debugging: load and write NaN / inf weights with a warning instead of refusing")
        p.set_defaults(func=_cmd_export, command=name)
