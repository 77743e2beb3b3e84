"""One package per paper; importing this package registers each of them
(moejax/extensions.py). A fifth paper is one new folder and one name here."""

from moejax.papers import omnimoe, mohge, loopmoe, l3  # noqa: F401  (each registers itself)
