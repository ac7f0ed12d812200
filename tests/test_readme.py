import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 2, "README keeps exactly two set-up commands"
    main_cmd, test_cmd = (b.strip() for b in blocks)
    assert "recon reconstruct" in main_cmd and "pytest" in test_cmd
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_the_bundle_model_card_names_no_machine_path():
    from recon import hub
    from recon.shapes.card import portable_command

    card = (hub.SHAPES_BUNDLE / "MODEL_CARD.md").read_text()
    assert "/tmp/" not in card and "/work/" not in card and "/root/" not in card
    assert (
        portable_command("recon shapes train --component vae --out /tmp/b/out --work=/tmp/b/w --threads 1")
        == "recon shapes train --component vae --out BUNDLE --work WORK --threads 1"
    )
