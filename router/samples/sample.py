"""A small inventory module used as a routing sample."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Item:
    name: str
    quantity: int = 0
    tags: list[str] = field(default_factory=list)

    def restock(self, amount: int) -> None:
        if amount <= 0:
            raise ValueError(f"amount must be positive, got {amount}")
        self.quantity += amount


class Inventory:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: dict[str, Item] = {}

    def load(self) -> None:
        if not self.path.exists():
            return
        for row in json.loads(self.path.read_text()):
            item = Item(row["name"], row.get("quantity", 0), row.get("tags", []))
            self.items[item.name] = item

    def save(self) -> None:
        rows = [vars(item) for item in sorted(self.items.values(), key=lambda i: i.name)]
        self.path.write_text(json.dumps(rows, indent=2))

    def low_stock(self, threshold: int = 5) -> list[Item]:
        return [item for item in self.items.values() if item.quantity < threshold]

    def by_tag(self, tag: str) -> list[Item]:
        return [item for item in self.items.values() if tag in item.tags]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Show items that are running low.")
    parser.add_argument("path", type=Path)
    parser.add_argument("--threshold", type=int, default=5)
    args = parser.parse_args(argv)
    inventory = Inventory(args.path)
    inventory.load()
    for item in inventory.low_stock(args.threshold):
        print(f"{item.name}: {item.quantity}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
