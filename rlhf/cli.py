"""The `rlhf` command: run, plan and inspect experiments.

    rlhf run CONFIG [key=value ...] [--until STAGE] [--force STAGE] [--launch ACCELERATE_CONFIG]
    rlhf plan CONFIG [key=value ...] [--memory [--launch ACCELERATE_CONFIG]]
    rlhf status [CONFIG] [--store ROOT]
    rlhf report CONFIG
    rlhf chat STAGE-or-ARTIFACT [--config CONFIG]
    rlhf generate STAGE-or-ARTIFACT --prompts FILE --out FILE [--samples K]
    rlhf label CANDIDATES --out PREFERENCES
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

log = logging.getLogger("rlhf")


def _setup_logging(verbose: bool) -> None:
    # Our own progress at INFO; libraries only when they warn (their INFO chatter buries the story).
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)
    # Under `accelerate launch` every rank runs the same pipeline; the main one tells the story.
    quiet_rank = os.environ.get("RANK", "0") != "0"
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet_rank else logging.INFO)


def _load(config: str, overrides: list[str]):
    from rlhf.config import load_experiment
    from rlhf.pipeline import Pipeline

    return Pipeline(load_experiment(config, overrides))


def _without_launch(argv: list[str]) -> list[str]:
    """The command line minus `--launch FILE` (what every launched process runs)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--launch":
            skip = True
        elif not a.startswith("--launch="):
            out.append(a)
    return out


def cmd_launch(args: argparse.Namespace) -> int:
    """Run this same command in every process of an Accelerate launch config; return the launch's exit code."""
    import subprocess

    from rlhf.distributed import launch_command

    cmd, env = launch_command(args.launch, ["-m", "rlhf.cli", *_without_launch(args.argv)])
    # every precondition once here, so a bad setting ends before any process starts
    _load(args.config, args.overrides).check(until=args.until, force=tuple(args.force))
    _warn_if_memory_short(args)
    log.info("launching: %s", " ".join(cmd))
    return subprocess.run(cmd, env=env).returncode


def _warn_if_memory_short(args: argparse.Namespace) -> None:
    """Before launching, the memory plan's warning (best effort: a plan that cannot be made is skipped)."""
    from rlhf.memory import DEFAULT_PROMPT_TOKENS, available_memory, plan_memory

    try:
        pipeline = _load(args.config, args.overrides)
        est, settings = plan_memory(pipeline, args.launch, prompt_tokens=DEFAULT_PROMPT_TOKENS)
        avail, where = available_memory(settings)
    except Exception as e:  # no RL stage, a hub config not reachable: the run itself will say more
        log.debug("memory plan skipped: %s", e)
        return
    if est.total > avail:
        log.warning("warning: stages.%s needs about %.1f GiB per process (a floor; prompts of %d tokens) but %s "
                    "has %.1f GiB; see `rlhf plan %s --memory --launch %s`", est.stage, est.total / (1 << 30),
                    est.prompt_tokens, where, avail / (1 << 30), args.config, args.launch)


def cmd_run(args: argparse.Namespace) -> int:
    from rlhf.distributed import LAUNCHED_ENV

    if args.launch and not os.environ.get(LAUNCHED_ENV):
        return cmd_launch(args)
    pipeline = _load(args.config, args.overrides)
    t0 = time.time()
    results = pipeline.run(until=args.until, force=tuple(args.force))
    from rlhf.distributed import is_main_process

    if not is_main_process():
        return 0
    print(f"\n{'stage':<12} {'key':<18} {'ran':<5} {'seconds':>8}  headline")
    for r in results:
        print(f"{r.name:<12} {r.key:<18} {'yes' if r.ran else 'no':<5} {r.seconds:>8.1f}  {type(pipeline.stages[r.name]).headline(r.metrics)}")
    for r in results:
        if not r.ran:
            print(f"{r.name}: up to date (key {r.key})")
    print(f"total {time.time() - t0:.1f}s; store {pipeline.store.url}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    pipeline = _load(args.config, args.overrides)
    for step in pipeline.check(until=args.until, force=tuple(args.force)):
        state = "will run" if step.will_run else "up to date"
        print(f"{step.name:<12} {step.key}  {state:<10}  {step.reason if step.will_run else ''}".rstrip())
    if args.memory:
        return memory_plan(pipeline, args.launch, args.prompt_tokens)
    return 0


def memory_plan(pipeline, launch: str | None, prompt_tokens: int) -> int:
    """Print the RL stage's memory table; 1 (with a warning) when it does not fit the device, else 0."""
    from rlhf.memory import available_memory, format_table, plan_memory

    try:
        est, settings = plan_memory(pipeline, launch, prompt_tokens)
    except (OSError, ValueError) as e:  # a hub config that cannot be fetched offline, no RL stage
        print(f"error: memory plan: {e}", file=sys.stderr)
        return 2
    table, fits = format_table(est, settings, available_memory(settings))
    print(f"\n{table}")
    bound = est.prompt_bound if est.prompt_bound and est.prompt_tokens != prompt_tokens else "--prompt-tokens"
    print(f"  (assumes prompts of {est.prompt_tokens} tokens; set {bound})")
    if not fits:
        print(f"warning: stages.{est.stage} needs more memory per process than is available; use more processes, "
              "ZeRO-3 or FSDP (configs/accelerate/), LoRA, or a smaller rollout_batch_size or micro-batch",
              file=sys.stderr)
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from rlhf.artifacts import ArtifactStore

    if args.config:
        from rlhf.config import load_experiment

        store = ArtifactStore.for_experiment(load_experiment(args.config, args.overrides).config, args.store)
    else:
        store = ArtifactStore(args.store or "artifacts")
    keys = store.keys()
    if not keys:
        print(f"no artifacts in {store.url}")
        return 0
    manifests = {k: store.manifest(k) for k in keys}
    print(f"{len(keys)} artifact(s) in {store.url}\n")
    for key, m in sorted(manifests.items(), key=lambda kv: kv[1].get("created", "")):
        exp, stage = m.get("experiment"), m.get("stage")
        alias = f"  [{exp}/{stage}]" if store.alias(exp, stage) == key else ""
        print(f"{key}  {stage:<11} {m.get('kind', ''):<13} {m.get('created', '')}{alias}")
        for fname, ref in m.get("inputs", {}).items():
            src = ref.get("stage") or ref.get("external")
            print(f"    <- {fname}: {src} {ref.get('key')}")
        if m.get("headline"):  # written by the stage class (`Stage.headline`) when it published
            print(f"    {m['headline']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rlhf.artifacts import ArtifactStore
    from rlhf.config import load_experiment
    from rlhf.report import write_report

    experiment = load_experiment(args.config, args.overrides)
    cfg = experiment.config
    store = ArtifactStore.for_experiment(cfg)
    out = Path(args.out or Path("reports") / cfg.name)
    try:
        path, plots, missing = write_report(store, experiment, out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if missing:
        print(f"note: stages not run yet for {cfg.name}: {', '.join(missing)} (the report covers the others)")
    print(f"wrote {path} with {len(plots)} plot(s): {', '.join(plots)}")
    return 0


def _load_model(ref: str, config: str | None):
    from rlhf.chat import resolve_model
    from rlhf.models import load_causal_lm

    try:
        path = resolve_model(ref, config)
    except (KeyError, ValueError) as e:  # not found; not a language model
        print(f"error: {e.args[0]}", file=sys.stderr)
        sys.exit(2)
    model, tok = load_causal_lm(path)
    return model.eval(), tok


def cmd_chat(args: argparse.Namespace) -> int:
    from rlhf.chat import chat_loop

    model, tok = _load_model(args.model, args.config)
    chat_loop(model, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from rlhf.chat import generate_file

    model, tok = _load_model(args.model, args.config)
    n = generate_file(model, tok, args.prompts, args.out, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, samples=args.samples)
    print(f"wrote {n} prompts' responses to {args.out}")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from rlhf.label import label, load_candidates

    label(load_candidates(args.candidates), args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rlhf.memory import DEFAULT_PROMPT_TOKENS

    p = argparse.ArgumentParser(
        prog="rlhf",
        description="Pretrain -> SFT -> reward model -> PPO, as stages that hand checkpoints through an artifact store.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def experiment_args(sp: argparse.ArgumentParser, config_required: bool = True) -> None:
        sp.add_argument("config", nargs=None if config_required else "?", help="experiment YAML, e.g. configs/tiny.yaml")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.pretrain.max_steps=50")

    run = sub.add_parser("run", help="run every out-of-date stage of an experiment")
    experiment_args(run)
    run.add_argument("--until", metavar="STAGE", help="stop after this stage (runs what it needs first)")
    run.add_argument("--force", metavar="STAGE", action="append", default=[], help="rerun this stage even if up to date")
    run.add_argument("--launch", metavar="FILE", help="run under `accelerate launch` with this config "
                                                      "(configs/accelerate/*.yaml: DDP, DeepSpeed, FSDP)")
    run.set_defaults(fn=cmd_run)

    plan = sub.add_parser("plan", help="show each stage's key, whether it would run, and why")
    experiment_args(plan)
    plan.add_argument("--until", metavar="STAGE")
    plan.add_argument("--force", metavar="STAGE", action="append", default=[])
    plan.add_argument("--memory", action="store_true",
                      help="estimate the RL stage's memory per process and warn if it cannot fit")
    plan.add_argument("--launch", metavar="FILE", help="the Accelerate launch config the memory plan is for")
    plan.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS,
                      help="prompt length the memory plan assumes where the RL stage sets no bound of its own")
    plan.set_defaults(fn=cmd_plan)

    status = sub.add_parser("status", help="list the artifacts in a store with their lineage")
    experiment_args(status, config_required=False)
    status.add_argument("--store", help="store root (default: the config's, else ./artifacts)")
    status.set_defaults(fn=cmd_status)

    report = sub.add_parser("report", help="write reports/<experiment>/report.md with plots")
    experiment_args(report)
    report.add_argument("--out", help="output directory (default reports/<experiment>)")
    report.set_defaults(fn=cmd_report)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("model", help="stage name (with --config), alias experiment/stage, artifact key, "
                                      "local model directory or hub id")
        sp.add_argument("--config", default="configs/tiny.yaml", help="experiment that stage names refer to")
        sp.add_argument("--max-new-tokens", type=int, default=64)
        sp.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")

    chat = sub.add_parser("chat", help="talk to a model through its chat template (/reset, /quit)")
    model_args(chat)
    chat.set_defaults(fn=cmd_chat)

    gen = sub.add_parser("generate", help="answer a file of prompts, writing JSON Lines")
    model_args(gen)
    gen.add_argument("--prompts", required=True, help='file of {"prompt"} rows')
    gen.add_argument("--out", required=True, help="output .jsonl")
    gen.add_argument("--batch-size", type=int, default=32)
    gen.add_argument("--samples", type=int, default=1, help="responses per prompt (2+ makes candidates for `rlhf label`)")
    gen.set_defaults(fn=cmd_generate)

    lab = sub.add_parser("label", help="pick the better of two responses in the terminal, writing preferences")
    lab.add_argument("candidates", help='JSON Lines of {"prompt", "responses": [...]} (rlhf generate --samples 2)')
    lab.add_argument("--out", required=True, help="preference file to append to (resumes where it stopped)")
    lab.set_defaults(fn=cmd_label)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options too (`rlhf run cfg.yaml --until sft seed=1`), as Make's ARGS puts them.
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(raw_argv)
    args.argv = raw_argv
    if extra:
        if not hasattr(args, "overrides") or not all("=" in x and not x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    _setup_logging(args.verbose)
    from rlhf.errors import ERRORS, rank_prefix

    try:
        return args.fn(args)
    except ERRORS as e:
        # Under a launch the failing rank exits non-zero and the launcher stops the others.
        print(f"error: {rank_prefix()}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished artifacts are kept, training state resumes on the next run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
