"""Command-line parsing shared by the benchmarks."""

__all__ = ["comma_list"]


def comma_list(cast=str):
    """An argparse ``type``: "8, 16," -> [cast("8"), cast("16")] (blanks dropped).

    A bad item reads as argparse's "invalid comma-separated int list value: '8,x'".
    """
    def parse(text):
        return [cast(t.strip()) for t in text.split(",") if t.strip()]

    parse.__name__ = f"comma-separated {cast.__name__} list"
    return parse
