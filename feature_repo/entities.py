"""Feast entities: the shopper and the catalogue item. Ids are strings (see recflow.schemas)."""

from feast import Entity, ValueType

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A shopper (Complete Journey: a household).",
)

item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.STRING,
    description="A catalogue item (Complete Journey: a product).",
)
