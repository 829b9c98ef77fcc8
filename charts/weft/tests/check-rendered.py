"""Checks that kubernetes-validate cannot: no YAML mapping in the rendered
chart repeats a key (PyYAML keeps the last one silently; the API server
rejects or warns), and every document is a named Kubernetes object.

usage: check-rendered.py RENDERED.yaml
"""

import sys

import yaml


class StrictLoader(yaml.SafeLoader):
    pass


def construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)


def main(path):
    with open(path) as f:
        docs = [d for d in yaml.load_all(f, Loader=StrictLoader) if d]
    if not docs:
        sys.exit(f"{path}: no objects rendered")
    for doc in docs:
        name = (doc.get("metadata") or {}).get("name")
        if not (doc.get("apiVersion") and doc.get("kind") and name):
            sys.exit(f"{path}: an object without apiVersion, kind or metadata.name: {str(doc)[:200]}")
    print(f"{path}: {len(docs)} objects, no duplicate keys")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    try:
        main(sys.argv[1])
    except yaml.YAMLError as e:
        sys.exit(f"{sys.argv[1]}: {e}")
