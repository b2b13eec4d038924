"""The error of bad input data (a raw file, an image, a video), which names the file and line,
item or video."""


class DataError(ValueError):
    """Bad input data; the message names the file and line."""
