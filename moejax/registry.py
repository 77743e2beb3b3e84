"""A name -> object table filled by decorators (sublayers, budgets, experiments)."""

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):

  def __init__(self, kind: str):
    self.kind = kind
    self._items: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def add(item: T) -> T:
      if name in self._items:
        raise ValueError(f"{self.kind} {name!r} is registered twice.")
      self._items[name] = item
      return item
    return add

  def get(self, name: str) -> T:
    if name not in self._items:
      raise KeyError(f"Unknown {self.kind} {name!r}; known: {self.names()}.")
    return self._items[name]

  def names(self) -> list[str]:
    return sorted(self._items)

  def __contains__(self, name: str) -> bool:
    return name in self._items
