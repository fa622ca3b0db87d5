"""CPU kernels (placeholder)."""


def load(required: bool = False):
    return None


def use_bf16_kernels(model) -> None:
    pass
