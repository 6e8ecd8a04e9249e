"""ComfyUI workflow files without ComfyUI: build the UI form, check it, convert it to the API form.

A workflow exists in two forms (research notes, comfyui-notes.md §6):
- the UI form ("workflow", version 0.4) that the frontend saves and the template browser loads:
  nodes with positions and `widgets_values`, links as [id, from node, from slot, to node, to slot, type];
- the API form ("prompt") that `POST /prompt` accepts: {node id: {class_type, inputs}}.

Everything here reads node definitions in the shape `GET /object_info` serves them, so the same
code works against a running ComfyUI and against the snapshot kept beside the tests. The UI -> API
conversion follows the frontend's `graphToPrompt` (ComfyUI_frontend 1.27): widget values are
mapped onto the node's widget inputs in definition order, an INT with `control_after_generate`
(or named seed / noise_seed) carries one extra, unsent value after it, linked inputs become
[origin id, origin slot], frontend-only nodes (notes) and muted or bypassed nodes are left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY_TYPES = {"Note", "MarkdownNote"}  # drawn by the frontend, never sent to the server
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
NODE_TITLE_HEIGHT, GROUP_TITLE_HEIGHT = 30, 50  # px above a node's pos; a group's title bar with a margin


# ---------------------------------------------------------------- node definitions


def _input_specs(node_def: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) of every non-hidden input, in the order the frontend builds them."""
    order = node_def.get("input_order") or {group: list(node_def["input"].get(group, {}))
                                             for group in ("required", "optional")}
    specs = []
    for group in ("required", "optional"):
        for name in order.get(group, []):
            spec = node_def["input"].get(group, {}).get(name)
            if spec is not None:
                specs.append((name, list(spec) if isinstance(spec, (list, tuple)) else [spec], group == "optional"))
    return specs


def _options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec: list) -> bool:
    kind = spec[0]
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not _options(spec).get("forceInput", False)


def combo_options(spec: list) -> list | None:
    """The allowed values of a combo input (V1 `[[...]]` or V3 `["COMBO", {"options": [...]}]`), else None."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return list(_options(spec).get("options", []))
    return None


def has_control_widget(name: str, spec: list) -> bool:
    """An INT whose seed control ('fixed', 'randomize', ...) the frontend adds as a second widget."""
    return spec[0] == "INT" and _options(spec).get("control_after_generate", name in ("seed", "noise_seed"))


def widget_inputs(node_def: dict) -> list[tuple[str, list]]:
    return [(name, spec) for name, spec, _ in _input_specs(node_def) if is_widget(spec)]


def socket_inputs(node_def: dict) -> list[tuple[str, str, bool]]:
    """(name, type, optional) of the inputs drawn as sockets (links), in slot order."""
    return [(name, spec[0], optional) for name, spec, optional in _input_specs(node_def) if not is_widget(spec)]


def widget_value_count(node_def: dict) -> int:
    return sum(2 if has_control_widget(name, spec) else 1 for name, spec in widget_inputs(node_def))


def default_value(spec: list):
    options = combo_options(spec)
    if "default" in _options(spec):
        return _options(spec)["default"]
    if options is not None:
        return options[0] if options else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[spec[0]]


def types_match(output_type: str, input_type: str) -> bool:
    """As the frontend and ComfyUI's validation accept: equal, '*' on either side, or a comma list."""
    if output_type == "*" or input_type == "*":
        return True
    return bool(set(output_type.split(",")) & set(input_type.split(",")))


# ---------------------------------------------------------------- building the UI form


@dataclass(frozen=True)
class Output:
    """An output socket of a node being built: node id and slot."""

    node: int
    slot: int
    type: str


@dataclass
class Workflow:
    """Builds a UI-form workflow from node definitions, so widget values land in the right order.

        w = Workflow(object_info)
        model = w.node("DugeLoadDemoModel", (0, 0))
        unlearn = w.node("DugeUnlearn", (400, 0), model=model.out("MODEL"), steps=40)
        w.to_json()

    Widgets not given take their default; a seed's control value is "fixed" unless given as
    `<name>_control`. Keyword values that are an `Output` become links.
    """

    object_info: dict
    nodes: list[dict] = field(default_factory=list)
    links: list[list] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)

    class Node:
        def __init__(self, workflow: "Workflow", record: dict, node_def: dict | None):
            self.workflow, self.record, self.node_def = workflow, record, node_def

        @property
        def id(self) -> int:
            return self.record["id"]

        def out(self, name_or_slot: str | int) -> Output:
            names = self.node_def["output_name"]
            slot = name_or_slot if isinstance(name_or_slot, int) else names.index(name_or_slot)
            return Output(self.id, slot, self.node_def["output"][slot])

    def node(self, node_type: str, pos: tuple[float, float], size: tuple[float, float] | None = None,
             title: str | None = None, **values) -> "Workflow.Node":
        node_id = len(self.nodes) + 1
        record: dict[str, Any] = {"id": node_id, "type": node_type, "pos": [float(pos[0]), float(pos[1])]}
        if node_type in FRONTEND_ONLY_TYPES:
            record.update(size=list(size or (400, 200)), flags={}, order=0, mode=MODE_ALWAYS, inputs=[], outputs=[],
                          properties={}, widgets_values=[values.pop("text")])
            record.update(color="#432", bgcolor="#653")  # the frontend's note colours
            if title:
                record["title"] = title
            if values:
                raise ValueError(f"{node_type}: unknown values {sorted(values)}")
            self.nodes.append(record)
            return Workflow.Node(self, record, None)

        node_def = self.object_info.get(node_type)
        if node_def is None:
            raise KeyError(f"{node_type}: not a node type of this ComfyUI")
        inputs = []
        for name, socket_type, optional in socket_inputs(node_def):
            slot = {"name": name, "type": socket_type, "link": None}
            if optional:
                slot["shape"] = 7  # how the frontend draws (and saves) an optional socket
            source = values.pop(name, None)
            if source is not None:
                if not isinstance(source, Output):
                    raise TypeError(f"{node_type}.{name}: a socket input takes a node output, got {source!r}")
                slot["link"] = self._link(source, node_id, len(inputs), socket_type)
            elif not optional:
                raise ValueError(f"{node_type}.{name}: required input not connected")
            inputs.append(slot)
        widgets_values = []
        for name, spec in widget_inputs(node_def):
            control = values.pop(f"{name}_control", "fixed")
            value = values.pop(name, default_value(spec))
            if isinstance(value, Output):
                raise TypeError(f"{node_type}.{name}: linking a widget input is not supported here")
            widgets_values.append(value)
            if has_control_widget(name, spec):
                widgets_values.append(control)
        if values:
            raise ValueError(f"{node_type}: unknown inputs {sorted(values)}")
        outputs = [{"name": name, "type": kind, "links": [], "slot_index": slot}
                   for slot, (name, kind) in enumerate(zip(node_def["output_name"], node_def["output"]))]
        record.update(size=list(size or estimate_size(node_def)), flags={}, order=0, mode=MODE_ALWAYS,
                      inputs=inputs, outputs=outputs, properties={"Node name for S&R": node_type},
                      widgets_values=widgets_values)
        if title:
            record["title"] = title
        self.nodes.append(record)
        return Workflow.Node(self, record, node_def)

    def _link(self, source: Output, target: int, target_slot: int, input_type: str) -> int:
        if not types_match(source.type, input_type):
            raise TypeError(f"node {source.node} output {source.slot} ({source.type}) cannot feed {input_type}")
        link_id = len(self.links) + 1
        self.links.append([link_id, source.node, source.slot, target, target_slot, source.type])
        self.nodes[source.node - 1]["outputs"][source.slot]["links"].append(link_id)
        return link_id

    def group(self, title: str, members: list["Workflow.Node"], color: str = "#3f789e") -> None:
        """A titled frame around `members` (node titles are drawn above `pos`, the group's above that)."""
        x0 = min(m.record["pos"][0] for m in members) - 20
        y0 = min(m.record["pos"][1] for m in members) - NODE_TITLE_HEIGHT - GROUP_TITLE_HEIGHT
        x1 = max(m.record["pos"][0] + m.record["size"][0] for m in members) + 20
        y1 = max(m.record["pos"][1] + m.record["size"][1] for m in members) + 20
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                            "color": color, "font_size": 24, "flags": {}})

    def to_json(self) -> dict:
        order = execution_order(self.nodes, self.links)
        for record in self.nodes:
            record["order"] = order[record["id"]]
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.75, "offset": [40, 60]}}, "version": 0.4}


def estimate_size(node_def: dict) -> tuple[int, int]:
    """A node size close to what the frontend computes (slots and widgets ~24 px, text boxes ~100 px)."""
    slots = max(len(socket_inputs(node_def)), len(node_def["output"]))
    height = 30 + 24 * slots
    for name, spec in widget_inputs(node_def):
        height += 110 if _options(spec).get("multiline") else 24
        if has_control_widget(name, spec):
            height += 24
    return 320, height


def execution_order(nodes: list[dict], links: list[list]) -> dict[int, int]:
    """A topological order of the nodes (the `order` field the frontend saves)."""
    parents = {n["id"]: set() for n in nodes}
    for _, origin, _, target, _, _ in links:
        parents[target].add(origin)
    order, placed = {}, set()
    while len(placed) < len(nodes):
        ready = sorted(i for i in parents if i not in placed and parents[i] <= placed)
        if not ready:
            raise ValueError("the workflow has a cycle")
        for node_id in ready:
            order[node_id] = len(order)
            placed.add(node_id)
    return order


# ---------------------------------------------------------------- checking the UI form


def check_ui(workflow: dict, object_info: dict, check_combo_values: bool = True) -> list[str]:
    """Everything wrong with a UI-form workflow for these node definitions (empty when it is right)."""
    errors: list[str] = []
    for key in ("last_node_id", "last_link_id", "nodes", "links", "version"):
        if key not in workflow:
            errors.append(f"missing top-level key '{key}'")
    if errors:
        return errors
    if workflow["version"] != 0.4:
        errors.append(f"version is {workflow['version']}, expected 0.4")
    nodes = {}
    for node in workflow["nodes"]:
        for key in ("id", "type", "pos", "size", "mode"):
            if key not in node:
                errors.append(f"node {node.get('id')}: missing '{key}'")
        if node.get("id") in nodes:
            errors.append(f"node id {node['id']} used twice")
        nodes[node.get("id")] = node
    if nodes and max(nodes) > workflow["last_node_id"]:
        errors.append(f"last_node_id {workflow['last_node_id']} is below node id {max(nodes)}")

    links = {}
    for link in workflow["links"]:
        if not (isinstance(link, list) and len(link) == 6):
            errors.append(f"link {link!r}: expected [id, origin, origin_slot, target, target_slot, type]")
            continue
        link_id, origin, origin_slot, target, target_slot, link_type = link
        if link_id in links:
            errors.append(f"link id {link_id} used twice")
        links[link_id] = link
        if origin not in nodes or target not in nodes:
            errors.append(f"link {link_id}: node {origin if origin not in nodes else target} does not exist")
            continue
        outputs, inputs = nodes[origin].get("outputs") or [], nodes[target].get("inputs") or []
        if not 0 <= origin_slot < len(outputs) or not 0 <= target_slot < len(inputs):
            errors.append(f"link {link_id}: slot out of range")
            continue
        if link_id not in (outputs[origin_slot].get("links") or []):
            errors.append(f"link {link_id}: not listed in node {origin} output {origin_slot}")
        if inputs[target_slot].get("link") != link_id:
            errors.append(f"link {link_id}: node {target} input {target_slot} names link {inputs[target_slot].get('link')}")
        if not types_match(outputs[origin_slot]["type"], inputs[target_slot]["type"]):
            errors.append(f"link {link_id}: {outputs[origin_slot]['type']} into {inputs[target_slot]['type']}")
        if link_type != outputs[origin_slot]["type"]:
            errors.append(f"link {link_id}: type {link_type}, the output is {outputs[origin_slot]['type']}")
    if links and max(links) > workflow["last_link_id"]:
        errors.append(f"last_link_id {workflow['last_link_id']} is below link id {max(links)}")
    for node in nodes.values():
        for slot, entry in enumerate(node.get("inputs") or []):
            if entry.get("link") is not None and entry["link"] not in links:
                errors.append(f"node {node['id']} input {entry['name']}: link {entry['link']} does not exist")
        for slot, entry in enumerate(node.get("outputs") or []):
            for link_id in entry.get("links") or []:
                if link_id not in links or links[link_id][1:3] != [node["id"], slot]:
                    errors.append(f"node {node['id']} output {entry['name']}: link {link_id} does not start here")

    for node in nodes.values():
        errors += [f"node {node['id']} ({node['type']}): {e}" for e in _check_node(node, object_info, check_combo_values)]
    return errors


def _check_node(node: dict, object_info: dict, check_combo_values: bool) -> list[str]:
    if node["type"] in FRONTEND_ONLY_TYPES:
        return []
    node_def = object_info.get(node["type"])
    if node_def is None:
        return ["unknown node type (neither a ComfyUI node nor a DUGE node)"]
    errors = []
    sockets = {name: (kind, optional) for name, kind, optional in socket_inputs(node_def)}
    widgets = dict(widget_inputs(node_def))
    for entry in node.get("inputs") or []:
        name = entry.get("name")
        if name in sockets:
            if not types_match(entry.get("type", ""), sockets[name][0]):
                errors.append(f"input {name} has type {entry.get('type')}, the node takes {sockets[name][0]}")
        elif name in widgets and entry.get("widget", {}).get("name") == name:
            pass  # a widget turned into a socket
        else:
            errors.append(f"input {name}: the node has no such input")
    linked = {e["name"] for e in node.get("inputs") or [] if e.get("link") is not None}
    missing = [name for name, (_, optional) in sockets.items() if not optional and name not in linked]
    if missing and node.get("mode", MODE_ALWAYS) == MODE_ALWAYS:
        errors.append(f"required inputs not connected: {missing}")
    outputs = [(o.get("name"), o.get("type")) for o in node.get("outputs") or []]
    expected = list(zip(node_def["output_name"], node_def["output"]))
    if [t for _, t in outputs] != [t for _, t in expected]:
        errors.append(f"outputs {outputs}, the node has {expected}")
    values = node.get("widgets_values") or []
    if len(values) != widget_value_count(node_def):
        errors.append(f"{len(values)} widget values, the node has {widget_value_count(node_def)} "
                      f"(widgets {[n for n, _ in widget_inputs(node_def)]}, seeds count twice)")
        return errors
    for name, spec, value, control in _widget_values(node_def, values):
        errors += [f"widget {name}: {e}" for e in _check_value(spec, value, check_combo_values)]
        if control is not None and control not in CONTROL_VALUES:
            errors.append(f"widget {name}: control value {control!r} is not one of {CONTROL_VALUES}")
    return errors


def _widget_values(node_def: dict, values: list):
    """(name, spec, value, control value or None) for each widget input."""
    position = 0
    for name, spec in widget_inputs(node_def):
        value = values[position]
        position += 1
        control = None
        if has_control_widget(name, spec):
            control = values[position]
            position += 1
        yield name, spec, value, control


def _check_value(spec: list, value, check_combo_values: bool) -> list[str]:
    options = combo_options(spec)
    if options is not None:
        if check_combo_values and options and value not in options:
            return [f"{value!r} is not one of {options[:8]}"]
        return []
    kind, limits = spec[0], _options(spec)
    if kind == "INT" and not (isinstance(value, int) and not isinstance(value, bool)):
        return [f"{value!r} is not an integer"]
    if kind == "FLOAT" and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return [f"{value!r} is not a number"]
    if kind == "STRING" and not isinstance(value, str):
        return [f"{value!r} is not text"]
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return [f"{value!r} is not true/false"]
    if kind in ("INT", "FLOAT"):
        if "min" in limits and value < limits["min"]:
            return [f"{value} is below the minimum {limits['min']}"]
        if "max" in limits and value > limits["max"]:
            return [f"{value} is above the maximum {limits['max']}"]
    return []


# ---------------------------------------------------------------- UI -> API


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-form prompt the frontend's graphToPrompt makes of a UI-form workflow."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    sent = {node_id for node_id, node in nodes.items()
            if node["type"] not in FRONTEND_ONLY_TYPES and node.get("mode", MODE_ALWAYS) == MODE_ALWAYS}
    bypassed = [node_id for node_id in nodes if nodes[node_id].get("mode") == MODE_BYPASS]
    if bypassed:
        raise NotImplementedError(f"bypassed nodes {bypassed}: their links would have to be rerouted")
    prompt = {}
    for node_id in sorted(sent):
        node = nodes[node_id]
        node_def = object_info[node["type"]]
        inputs = {}
        for name, _, value, _ in _widget_values(node_def, node.get("widgets_values") or []):
            inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for entry in node.get("inputs") or []:
            link = links.get(entry.get("link"))
            if link is None:
                continue
            if link[1] in sent:
                inputs[entry["name"]] = [str(link[1]), link[2]]
            else:
                inputs.pop(entry["name"], None)
        prompt[str(node_id)] = {"inputs": inputs, "class_type": node["type"],
                                "_meta": {"title": node.get("title") or node_def.get("display_name") or node["type"]}}
    return prompt


def check_api(prompt: dict, object_info: dict, check_combo_values: bool = True) -> list[str]:
    """Everything wrong with an API-form prompt for these node definitions (ComfyUI validates the same
    way: known class, every required input present, no unknown input, links to existing outputs)."""
    errors = []
    for node_id, node in prompt.items():
        where = f"node {node_id} ({node.get('class_type')})"
        node_def = object_info.get(node.get("class_type"))
        if node_def is None:
            errors.append(f"{where}: unknown class_type")
            continue
        specs = {name: (spec, optional) for name, spec, optional in _input_specs(node_def)}
        inputs = node.get("inputs", {})
        for name, (spec, optional) in specs.items():
            if name not in inputs:
                if not optional:
                    errors.append(f"{where}: required input '{name}' missing")
                continue
            value = inputs[name]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                source = prompt.get(value[0])
                if source is None:
                    errors.append(f"{where}: input '{name}' links to missing node {value[0]}")
                    continue
                source_def = object_info.get(source.get("class_type"), {"output": []})
                if not 0 <= value[1] < len(source_def["output"]):
                    errors.append(f"{where}: input '{name}' links to output {value[1]} of node {value[0]}, "
                                  f"which has {len(source_def['output'])}")
                elif not types_match(source_def["output"][value[1]], "COMBO" if combo_options(spec) else spec[0]):
                    errors.append(f"{where}: input '{name}' ({spec[0]}) fed {source_def['output'][value[1]]}")
            elif is_widget(spec):
                errors += [f"{where}: input '{name}': {e}" for e in _check_value(spec, value, check_combo_values)]
            else:
                errors.append(f"{where}: input '{name}' takes a link, got {value!r}")
        for name in inputs:
            if name not in specs:
                errors.append(f"{where}: unknown input '{name}'")
    return errors


def is_api_form(data: dict) -> bool:
    """True for an API-form prompt (what POST /prompt takes), False for a UI-form workflow."""
    return "nodes" not in data and all(isinstance(v, dict) and "class_type" in v for v in data.values())


# ---------------------------------------------------------------- node-definition snapshots

SNAPSHOT_KEYS = ("input", "input_order", "output", "output_name", "name", "display_name", "output_node", "category",
                 "python_module")
USER_FILE_COMBOS = {"ckpt_name", "lora_name", "vae_name"}  # lists of the user's model files: not kept


def snapshot(object_info: dict, node_types) -> dict:
    """The parts of /object_info that building, checking and converting workflows read, without the
    lists of model files found on the machine that made it."""
    result = {}
    for node_type in sorted(set(node_types)):
        node_def = json.loads(json.dumps({k: object_info[node_type][k] for k in SNAPSHOT_KEYS
                                          if k in object_info[node_type]}))
        for group in node_def["input"].values():
            for name, spec in group.items():
                if name in USER_FILE_COMBOS and combo_options(spec) is not None:
                    group[name] = [[], *spec[1:]] if isinstance(spec[0], list) else ["COMBO", {**spec[1], "options": []}]
        result[node_type] = node_def
    return result


def interface(node_def: dict) -> dict:
    """What a saved workflow depends on: socket and widget inputs in order, and the outputs."""
    return {"sockets": socket_inputs(node_def),
            "widgets": [(name, has_control_widget(name, spec)) for name, spec in widget_inputs(node_def)],
            "outputs": list(zip(node_def["output_name"], node_def["output"]))}
