"""Every setting of an attack on an edited model (`duge.attacks`), in one torch-free dataclass.

`duge attack`, `duge unlearn --attack` and the benchmarks fill an `AttackConfig`; each field's
`metadata["help"]` is the one description of the setting. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .errors import DugeError

ATTACKS = ("prompt", "inversion", "both")
SEARCHES = ("auto", "greedy", "gradient")
POSITIONS = ("prefix", "insert")
BACKWARD_COST = 2  # a backward pass through the UNet counted as two forward passes (the usual FLOP estimate)

__all__ = ["AttackConfig", "ATTACKS", "SEARCHES", "POSITIONS", "BACKWARD_COST"]


def _setting(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class AttackConfig:
    """How hard each attack tries and how its result is judged (module doc of `duge.attacks`)."""

    attack: str = _setting("both", "which attacks to run: the prompt search, the concept inversion, or both",
                           choices=ATTACKS)
    budget: int = _setting(4000, "edited-UNet passes of one latent each attack may spend per concept (a backward "
                           f"pass counts as {BACKWARD_COST}); the same for every model attacked")
    search: str = _setting("auto", "prompt search: greedy coordinate search over the whole vocabulary, or the "
                           "gradient-guided search (one-hot gradients, GCG); auto: greedy for vocabularies of at "
                           "most greedy_vocabulary_limit tokens", choices=SEARCHES)
    tokens: int = _setting(5, "prompt search: attack tokens added to the prompt")
    position: str = _setting("prefix", "prompt search: attack tokens before the prompt, or spread between its words",
                             choices=POSITIONS)
    greedy_vocabulary_limit: int = _setting(1024, "search=auto: the largest vocabulary searched greedily")
    top_k: int = _setting(16, "gradient search: tokens per position taken from the gradient's most promising")
    candidates: int = _setting(32, "gradient search: single-token swaps evaluated per step")
    inversion_learning_rate: float = _setting(5e-3, "concept inversion: Adam's learning rate for the token embedding")
    inversion_batch: int = _setting(8, "concept inversion: noisy latents per gradient step")
    initializer: str = _setting("", "concept inversion: the word whose embedding the new token starts from "
                                "('': the mean embedding of the vocabulary)")
    objective_images: int = _setting(4, "images of the target the unedited model draws for the attack's objective")
    objective_timesteps: int = _setting(2, "noise levels per objective image (fixed draws, stratified over the "
                                        "schedule)")
    eval_images: int = _setting(16, "images the attacked model draws from the attack's result for the judgement, "
                                "from held-out seeds")
    sample_steps: int = _setting(20, "sampler steps of every image drawn")
    guidance: float = _setting(7.5, "classifier-free guidance of every image drawn")
    seed: int = _setting(0, "seed of the objective's images (seed, seed+1, ...), noise and the search's choices")
    eval_seed: int = _setting(100_000, "first seed of the judgement's images (held out from the objective's)")

    def validate(self) -> None:
        for name, allowed in (("attack", ATTACKS), ("search", SEARCHES), ("position", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise DugeError(f"attack setting {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("budget", "tokens", "top_k", "candidates", "inversion_batch", "objective_images",
                     "objective_timesteps", "eval_images", "sample_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DugeError(f"attack setting {name} must be a whole number of at least 1, got {value!r}")
        if not self.inversion_learning_rate > 0:
            raise DugeError(f"attack setting inversion_learning_rate must be positive, got {self.inversion_learning_rate!r}")
        held_out = range(self.eval_seed, self.eval_seed + self.eval_images)
        used = range(self.seed, self.seed + self.objective_images)
        if held_out.start < used.stop and used.start < held_out.stop:
            raise DugeError(f"attack seeds overlap: the objective uses seeds {used.start}..{used.stop - 1} and the "
                            f"judgement {held_out.start}..{held_out.stop - 1}; the judgement's must be held out")

    @property
    def attacks(self) -> tuple[str, ...]:
        """The attacks to run, in order: ("prompt",), ("inversion",) or both."""
        return ("prompt", "inversion") if self.attack == "both" else (self.attack,)


HELP = {f.name: f.metadata["help"] for f in fields(AttackConfig)}
