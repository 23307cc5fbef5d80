"""CPU fake of MetaX's mcoplib (see ../README.md): ``import mcoplib._C`` / ``mcoplib._moe_C`` register the ops."""

__version__ = "0.0+metax.fake"
