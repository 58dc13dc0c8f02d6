"""One module per layer kind; `KINDS` maps the pattern character to its module."""
from . import attention, mamba, mlp, moe

KINDS = {"M": mamba, "*": attention, "-": mlp, "E": moe}
