"""The datasets convflat knows by name: one table, importable without torch.

Every built-in source is one :class:`Source` row of :data:`SOURCES`. The rest of the package
derives what it needs from it: :mod:`convflat.data` its loaders, aliases and default
augmentation, the download step of the workflow the torchvision class and the files to fetch,
:mod:`convflat.study` the training-set size and image shape of the time estimate, and the
command-line help its list of names. Adding a dataset is adding a row here (a torchvision
benchmark needs nothing else; a source with its own reader also needs a loader in
``convflat.data._load_source``).

User data are not in the table: ``npz:PATH`` and ``folder:PATH`` (see
:func:`convflat.data.prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SOURCES", "USER_SOURCES", "Source", "find_source", "source_names"]


@dataclass(frozen=True)
class Source:
    """One built-in dataset.

    Attributes:
        name: the name in configs and on the command line (``cifar10``).
        torchvision: class name in ``torchvision.datasets`` (downloaded into
            ``<root>/``), or None for a source that needs no download.
        split: how the test set is chosen: ``"train"`` (torchvision's ``train=False``),
            ``"split"`` (torchvision's ``split="test"``) or ``"random"`` (a class-stratified
            ``test_fraction`` of all images, seeded).
        n_images: the training images the time estimate starts from: the official
            training split (for the 8 x 8 digits, about 1437 of 1797 at a 0.2 test share; the
            estimate takes the configured test share off this figure once more, as it
            always has: it is an estimate).
        image_size: (H, W) in pixels.
        channels: image channels.
        classes: number of classes.
        crop_padding: default random-crop augmentation, zero-padding in pixels per side.
        flip: default random horizontal flips (natural photographs and clothing only).
        aliases: other spellings accepted for ``name``.
    """

    name: str
    torchvision: str | None
    split: str
    n_images: int
    image_size: tuple[int, int]
    channels: int
    classes: int
    crop_padding: int
    flip: bool
    aliases: tuple[str, ...] = ()


#: name -> :class:`Source`, in the order the help lists them.
SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("mnist", "MNIST", "train", 60000, (28, 28), 1, 10, 2, False),
    Source("fashion-mnist", "FashionMNIST", "train", 60000, (28, 28), 1, 10, 2, True,
           aliases=("fashionmnist", "fashion_mnist")),
    Source("kmnist", "KMNIST", "train", 60000, (28, 28), 1, 10, 2, False),
    Source("cifar10", "CIFAR10", "train", 50000, (32, 32), 3, 10, 4, True,
           aliases=("cifar-10",)),
    Source("cifar100", "CIFAR100", "train", 50000, (32, 32), 3, 100, 4, True,
           aliases=("cifar-100",)),
    Source("svhn", "SVHN", "split", 73257, (32, 32), 3, 10, 4, False),
    # 8 x 8 digits that ship with scikit-learn: no network; not augmented (1 pixel is 1/8
    # of the image). n_images: the estimate's figure of the training images.
    Source("sklearn-digits", None, "random", 1437, (8, 8), 1, 10, 0, False,
           aliases=("digits", "sklearn_digits")),
)}

#: Sources that name a user's files instead of a row of :data:`SOURCES`.
USER_SOURCES = ("npz:PATH", "folder:PATH")


def source_names() -> str:
    """Every accepted source as text for help messages: ``mnist, ..., npz:PATH, folder:PATH``."""
    return ", ".join((*SOURCES, *USER_SOURCES))


def find_source(name: str) -> Source | None:
    """The row of :data:`SOURCES` that ``name`` (or one of its aliases, in any case) names;
    None for anything else (``npz:PATH``, ``folder:PATH``, a typo)."""
    key = str(name).strip().lower()
    for source in SOURCES.values():
        if key == source.name or key in source.aliases:
            return source
    return None
