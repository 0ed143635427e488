"""Write docs/params.md, the params reference, from the config models (`make params-doc`)."""

from pathlib import Path

from components.config import params_reference

if __name__ == "__main__":
    target = Path(__file__).resolve().parent.parent / "docs" / "params.md"
    target.write_text(params_reference())
    print(f"wrote {target}")
