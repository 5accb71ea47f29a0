"""Rows that name their teacher (``--teachers`` with ``teacher_routing column``): each training row's value of the
teacher column becomes the index of its teacher in ``ROUTE_COLUMN`` (``NO_TEACHER`` where it names none)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError
from ..teachers import parse_teachers

ROUTE_COLUMN = "teacher_index"  # the training rows' column: the index of each row's teacher in --teachers
NO_TEACHER = -1  # a row naming no teacher: it trains with CE only


@dataclass(frozen=True)
class RowRoutes:
    """How a row names its teacher: the column, the teachers' names in --teachers order, and whether every row
    must name one (on-policy steps score each row's answers by its teacher)."""

    column: str
    names: tuple[str, ...]
    required: bool = False

    def route(self, row: dict) -> int:
        """The row's teacher index; a bad value is a DataError naming the column."""
        value = row.get(self.column)
        if value is None or (isinstance(value, str) and not value.strip()):
            if self.required:
                raise DataError(f"names no teacher, and on-policy steps score each row's answers by its teacher: "
                                f"name one of {', '.join(self.names)}", field=self.column)
            return NO_TEACHER
        if value not in self.names:
            raise DataError(f"names teacher {value!r}, which is not one of --teachers ({', '.join(self.names)})",
                            field=self.column)
        return self.names.index(value)

    def check_columns(self, columns: list[str], source: str) -> None:
        if self.column not in columns:
            raise DataError(f"teacher_routing column reads each row's teacher from a '{self.column}' column, which "
                            f"the data lacks: add it (one of {', '.join(self.names)} per row), name another with "
                            "--teacher_column, or use teacher_routing mixture", source=source, field=self.column)


def row_routes(config) -> RowRoutes | None:
    """How a run's training rows name their teacher (--teachers with teacher_routing column), or None."""
    members = parse_teachers(config.training.teachers)
    if not members or config.training.teacher_routing != "column":
        return None
    return RowRoutes(config.training.teacher_column, tuple(member["name"] for member in members),
                     required=config.training.on_policy_fraction > 0)
