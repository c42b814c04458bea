"""The question wordings of the synthetic scenes (`blip2.data.scenes`): pure data."""

from __future__ import annotations

# Question wordings per type, as str.format templates over {shape}, {color} and {object} ("a red circle").
# The first training wording is canonical. Every word of a held-out wording occurs in some training wording or
# caption: held-out wordings test new arrangements of known words, not new words.
TRAIN_WORDINGS: dict[str, tuple[str, ...]] = {
    "count": (
        "how many shapes are there?",
        "how many objects are in the picture?",
        "how many shapes can you see?",
        "what number of shapes does the picture show?",
    ),
    "color": (
        "what color is the {shape}?",
        "which color is the {shape}?",
        "what is the color of the {shape}?",
        "what color does the {shape} have?",
    ),
    "shape": (
        "what shape is the {color} object?",
        "which shape is the {color} object?",
        "what is the shape of the {color} object?",
        "tell me the shape of the {color} object.",
    ),
    "position": (
        "where is the {color} {shape}?",
        "where in the picture is the {color} {shape}?",
        "where can you see the {color} {shape}?",
        "in which part of the picture is the {color} {shape}?",
    ),
    "exists": (
        "is there {object}?",
        "can you see {object}?",
        "is there {object} in the picture?",
        "do you see {object}?",
    ),
}
HELD_OUT_WORDINGS: dict[str, tuple[str, ...]] = {
    "count": (
        "how many shapes does the picture show?",
        "in the picture, how many objects are there?",
    ),
    "color": (
        "the {shape} is what color?",
        "which color does the {shape} have?",
        "tell me the color of the {shape}.",
    ),
    "shape": (
        "the {color} object is what shape?",
        "what shape does the {color} object have?",
        "which shape does the {color} object have?",
    ),
    "position": (
        "the {color} {shape} is where?",
        "where does the picture show the {color} {shape}?",
        "which part of the picture is the {color} {shape} in?",
    ),
    "exists": (
        "does the picture show {object}?",
        "do you see {object} in the picture?",
    ),
}


__all__ = ["HELD_OUT_WORDINGS", "TRAIN_WORDINGS"]
