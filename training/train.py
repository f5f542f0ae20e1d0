"""Time-budgeted training of the retrieval model; writes a Hugging Face folder.

    python -m training.train --out OUT/retrieval-llama --minutes 7

Curriculum over prompt length (128 -> 16K tokens) by fraction of the budget (a phase
starts only once the one before is learnt), ending on a mix of 2K-16K prompts so that the
long phases do not unlearn the short lengths; AdamW with warmup and cosine decay on the same
clock, loss on the answer token of every query. Every twelfth of the budget the model is scored on validation prompts (4K, 8K, 16K) and the best
weights are kept; at the end those are exported (fp16) and scored on test prompts at
`--eval-lengths`. `--steps N` replaces the clock by a step count (a reproducible run).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from training.evaluate import TEST_SEED, VALID_SEED, autocast, dense_accuracy, split_seed
from training.export import export_hf
from training.model import ModelConfig, RetrievalLlama
from training.retrieval_data import sample_batch
from training.vocab import VOCAB


@dataclass(frozen=True)
class Phase:
    """From `start` (fraction of the run) on, train on sequences of one of `lengths` tokens
    (drawn per step)."""

    start: float
    lengths: tuple[int, ...]

    @property
    def length(self) -> int:
        """The longest length of the phase."""
        return max(self.lengths)


CURRICULUM = (
    Phase(0.00, (128,)),
    Phase(0.05, (512,)),
    Phase(0.15, (2048,)),
    Phase(0.30, (4096,)),
    Phase(0.50, (8192,)),
    Phase(0.70, (16384,)),
    Phase(0.85, (2048, 4096, 8192, 16384)),
)
MIN_NEEDLES, MAX_NEEDLES = 4, 32
# A phase longer than the current one starts only after the training accuracy of a log
# window (LOG_EVERY steps) reached UNLOCK_ACC: a slow start delays the long phases instead
# of training on 16K tokens before retrieval works at all.
UNLOCK_ACC = 0.5
LOG_EVERY = 50
NUM_VALIDATIONS = 12


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output model folder")
    p.add_argument("--minutes", type=float, default=7.0, help="training time budget")
    p.add_argument("--steps", type=int, default=None, help="train this many steps instead")
    p.add_argument("--seed", type=int, default=20251024)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=150)
    p.add_argument("--tokens-per-step", type=int, default=1 << 16)
    p.add_argument("--max-len", type=int, default=16384, help="drop longer curriculum phases")
    p.add_argument("--hidden", type=int, default=ModelConfig.hidden_size)
    p.add_argument("--intermediate", type=int, default=ModelConfig.intermediate_size)
    p.add_argument("--layers", type=int, default=ModelConfig.num_hidden_layers)
    p.add_argument("--heads", type=int, default=ModelConfig.num_attention_heads)
    p.add_argument("--kv-heads", type=int, default=ModelConfig.num_key_value_heads)
    p.add_argument("--valid-lengths", default="4096,8192,16384")
    p.add_argument("--valid-prompts", type=int, default=128)
    p.add_argument("--eval-lengths", default="4096,8192,16384,32768")
    p.add_argument("--eval-prompts", type=int, default=256)
    p.add_argument("--eval-needles", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    args.valid_lengths = [int(x) for x in args.valid_lengths.split(",")]
    args.eval_lengths = [int(x) for x in args.eval_lengths.split(",")]
    if not any(ph.length <= args.max_len for ph in CURRICULUM):
        raise SystemExit(f"--max-len={args.max_len}: must be >= {CURRICULUM[0].length}")
    return args


def phase_index(progress: float, unlocked: int, max_len: int) -> int:
    """Curriculum phase at `progress` in [0, 1], at most `unlocked` (phases the model has
    mastered the one before of) and never longer than `max_len`."""
    due = [i for i, ph in enumerate(CURRICULUM) if ph.start <= progress and ph.length <= max_len]
    return min(due[-1], unlocked)


def learning_rate(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine from `peak` to peak/10 over progress."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: RetrievalLlama, lr: float, device: torch.device):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def train(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    config = ModelConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
    )
    model = RetrievalLlama(config).to(device)
    opt = make_optimizer(model, args.lr, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    budget_s = args.minutes * 60
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    say(f"device {name}; {n_params / 1e6:.2f}M parameters; config {asdict(config)}")
    log: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "steps": [], "valid": []}
    best = {"score": -1.0, "step": 0, "state": None}

    def validate(step: int, elapsed: float) -> None:
        accs = {
            n: dense_accuracy(
                model, n, args.valid_prompts, args.eval_needles, split_seed(VALID_SEED, n)
            )
            for n in args.valid_lengths
        }
        score = sum(accs.values()) / len(accs)
        if score >= best["score"]:
            best.update(score=score, step=step, state=_copy_state(model))
        log["valid"].append({"step": step, "elapsed_s": round(elapsed, 1), **accs})
        say(f"  valid step {step}: " + " ".join(f"{n}: {a:.3f}" for n, a in accs.items()))

    t0 = time.monotonic()
    step, done_validations, window_loss, window_acc, window_tokens = 0, 0, 0.0, 0.0, 0
    unlocked, skipped = 0, 0
    window_start = t0
    while True:
        elapsed = time.monotonic() - t0
        progress = step / args.steps if args.steps else elapsed / budget_s
        if progress >= 1.0:
            break
        due = min(NUM_VALIDATIONS - 1, int(progress * NUM_VALIDATIONS))
        if due > done_validations:
            validate(step, elapsed)
            done_validations = due
        phase = phase_index(progress, unlocked, args.max_len)
        lengths = CURRICULUM[phase].lengths
        # Single-length phases draw nothing, so the data stream before the mixed phase
        # does not depend on it.
        length = lengths[0]
        if len(lengths) > 1:
            length = lengths[int(torch.randint(len(lengths), (1,), generator=gen, device=device))]
        batch_size = max(1, args.tokens_per_step // length)
        hi = min(MAX_NEEDLES, length // 16)
        needles = int(torch.randint(MIN_NEEDLES, hi + 1, (1,), generator=gen, device=device))
        batch = sample_batch(batch_size, length, needles, gen, device)
        lr = learning_rate(step, progress, args.lr, args.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast(device):
            logits = model.logits_at(batch.tokens, batch.query_pos)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.answers.flatten())
        loss_value = loss.item()
        opt.zero_grad(set_to_none=True)
        if math.isfinite(loss_value):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        else:
            skipped += 1
            say(f"step {step}: loss {loss_value}, update skipped ({skipped} so far)")
        step += 1
        window_loss += loss_value
        window_acc += (logits.argmax(-1) == batch.answers).float().mean().item()
        window_tokens += batch.tokens.numel()
        if step % LOG_EVERY == 0:
            now = time.monotonic()
            row = {
                "step": step,
                "elapsed_s": round(now - t0, 1),
                "length": length,
                "lr": lr,
                "loss": window_loss / LOG_EVERY,
                "train_acc": window_acc / LOG_EVERY,
                "tokens_per_s": window_tokens / (now - window_start),
            }
            log["steps"].append(row)
            say(
                f"step {step:6d} {row['elapsed_s']:7.1f}s len {length:6d} lr {lr:.2e} "
                f"loss {row['loss']:.4f} acc {row['train_acc']:.3f} "
                f"{row['tokens_per_s'] / 1e6:.2f}M tok/s"
            )
            if row["train_acc"] >= UNLOCK_ACC and phase == unlocked:
                unlocked += 1
            window_loss, window_acc, window_tokens, window_start = 0.0, 0.0, 0, now
    validate(step, time.monotonic() - t0)
    train_s = time.monotonic() - t0
    model.load_state_dict(best["state"])
    say(f"trained {step} steps in {train_s:.0f}s; best validation at step {best['step']}")
    export_hf(model, args.out)

    final = {}
    for n in args.eval_lengths:
        acc = dense_accuracy(
            model, n, args.eval_prompts, args.eval_needles, split_seed(TEST_SEED, n)
        )
        final[n] = acc
    say(
        f"\ndense exact-match accuracy, {args.eval_prompts} test prompts per length, "
        f"{args.eval_needles} needles"
    )
    say("| length | accuracy |\n|---:|---:|")
    for n, acc in final.items():
        say(f"| {n} | {acc:.3f} |")
    log.update(
        steps_done=step,
        skipped_steps=skipped,
        train_seconds=round(train_s, 1),
        best_step=best["step"],
        parameters=n_params,
        device=name,
        test_accuracy={str(n): a for n, a in final.items()},
        tokenizer_words=VOCAB.size,
    )
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    say(f"wrote {args.out} in {time.monotonic() - t0:.0f}s total")
    return log


def say(*parts: object) -> None:
    """Print and flush (the log is read live through a pipe)."""
    print(*parts, flush=True)


def _copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
