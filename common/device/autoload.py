"""torch.backends entry point (stub until the emulated device lands)."""


def autoload() -> None:
    return None
