"""One way to name a model: its directory and how to load it, shared by every model a run
loads (the policy, a teacher, the reference, a reward model)."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_unified.specs.checks import one_of

# the loading options a config may give beside a model's path (load_causal_lm's keywords)
LOAD_OPTIONS = ("dtype", "attn_implementation", "trust_remote_code")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass
class ModelRef:
    """A Hugging Face model: ``path`` (a local directory, or a hub id where a hub is
    reachable; None where the role has a default, such as the reference's starting policy)
    and how to load it. ``dtype`` None keeps the checkpoint's."""

    path: str | None = None
    dtype: str | None = None
    attn_implementation: str | None = None
    # run the checkpoint's own modelling code (off unless the user trusts it)
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str):  # Python callers may give a torch.dtype
            one_of("model", "dtype", self.dtype, DTYPE_NAMES)

    @classmethod
    def of(cls, path: str | None, options: dict | None, owner: str) -> ModelRef:
        """``path`` with a config's loading ``options`` (``owner`` names them in errors)."""
        options = dict(options or {})
        unknown = set(options) - set(LOAD_OPTIONS)
        if unknown:
            raise ValueError(f"{owner} has unknown key(s) {sorted(unknown)}; known: {list(LOAD_OPTIONS)}")
        if isinstance(options.get("dtype"), str):
            one_of(owner, "dtype", options["dtype"], DTYPE_NAMES)
        return cls(path, **options)

    @property
    def options(self) -> dict:
        """The loading keywords (:func:`lightning_unified.models.loading.load_causal_lm`)."""
        return {"dtype": self.dtype, "attn_implementation": self.attn_implementation,
                "trust_remote_code": self.trust_remote_code}
