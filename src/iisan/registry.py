"""The one shape of the project's registries (methods, tables, dataset kinds, backbone families):
a dict of entries by name that entries join through `register`, refusing a second entry of one
name or a name outside `pattern`, and that names what it holds when asked for an unknown one."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """Entries of one kind by their `name`. `what` names the kind in messages ("method");
    `pattern`, when given, is the regex every name must match, `form` says it in words and `why`
    what the name is used for; `check(entry)` refuses an entry for reasons of its own kind (raises
    ValueError)."""

    def __init__(self, what: str, pattern: str | None = None, form: str = "", why: str = "",
                 check: Callable[[T], None] | None = None):
        super().__init__()
        self.what, self.pattern, self.form, self.why, self.check = what, pattern, form, why, check

    def register(self, entry: T) -> T:
        name = entry.name
        if self.pattern and not re.fullmatch(self.pattern, name):
            raise ValueError(f"{self.what} {name!r}: a name is {self.form or 'of the form'} ({self.pattern}){self.why}")
        if name in self:
            raise ValueError(f"{self.what} {name!r} is already registered")
        if self.check is not None:
            self.check(entry)
        self[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self.pop(name, None)

    def lookup(self, name: str, where: str | None = None) -> T:
        """The entry `name`; an unknown name is a ValueError naming `where` (default: the kind) and
        every registered name."""
        try:
            return self[name]
        except KeyError:
            raise ValueError(f"{where or self.what}: unknown {self.what} {name!r} (known: {', '.join(self) or 'none'})") from None
