"""Queue-time checks of the pack's nodes: every widget value is checked when a prompt is queued, with
ComfyUI's own rules (numbers in their ranges, dropdown values among their options) plus finiteness and
each node's own rules, and every problem is reported against the one input it concerns.

Why the pack checks ComfyUI's rules itself: ComfyUI skips its range and dropdown checks for the inputs a
node's ``validate_inputs`` reads, and ComfyUI 0.3.64 never checks a V3 node's dropdowns. A node built on
``CheckedNode`` reads all of its inputs and checks them here, the same way on every ComfyUI version.

Why the pack narrows ComfyUI's report: ComfyUI attaches a failed ``validate_inputs`` to every input the
function reads, so one wrong value would mark every widget red. ``attribute_to_inputs`` wraps ComfyUI's
``execution.validate_inputs`` so that, for this pack's nodes only, each problem becomes one error on its
own input (other nodes' results pass through untouched; if ComfyUI's validation changes shape, it leaves
the result as it is). Without the wrapper the checks still refuse, with all messages on every input.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os

import folder_paths
from comfy_api.latest import io

LINKED = None  # what ComfyUI passes validate_inputs for an input linked to another node's output
MAX_LISTED_OPTIONS = 8  # a dropdown's options named in a message; longer lists are cut


class CheckedNode(io.ComfyNode):
    """A node whose every input is checked at queue time (this module). Subclasses may add
    ``input_rules(values) -> {input: message}`` for rules of their own (read only inputs that passed the
    common checks: the others are absent from ``values`` or None when linked), ``still_accepted(input,
    value)`` for values a dropdown no longer lists but saved workflows hold, and ``choice_hint(input, value)``."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # ComfyUI calls validate_inputs on a locked copy of the class (whose schema cannot be cached): the checks
        # use the node's own class. The copies carry this attribute over from its __dict__.
        if "node_class" not in cls.__dict__:
            cls.node_class = cls

    @classmethod
    def validate_inputs(cls, **values):
        problems = input_problems(cls.node_class, values)
        if not problems:
            return True
        return "\n".join(f"{name}: {message}" for name, message in problems.items())

    @classmethod
    def input_rules(cls, values):
        return {}

    @classmethod
    def still_accepted(cls, name, value):
        return False

    @classmethod
    def choice_hint(cls, name, value):
        """More words for a dropdown value that is not a choice (e.g. where a missing file goes), or None."""
        return None


def declared_inputs(node_class):
    """``{input: (type, options)}`` of a node, as ComfyUI validates them (its V1 view of the schema)."""
    types = node_class.INPUT_TYPES()
    return {name: spec for category in ("required", "optional") for name, spec in types.get(category, {}).items()}


def input_problems(node_class, values):
    """``{input: message}``: every problem of ``values`` (the inputs as ComfyUI passes them to validate_inputs:
    converted widget values, None for linked inputs), the common checks first, then the node's own rules."""
    display = node_class.GET_SCHEMA().display_name
    declared = declared_inputs(node_class)
    problems, checked = {}, {}
    for name, value in values.items():
        if name not in declared:
            checked[name] = value  # an input the schema no longer declares: the node's own rules name it
            continue
        kind, options = declared[name]
        message = value_problem(kind, options, value)
        if message is NOT_CHECKABLE:
            continue  # ComfyUI reports it itself (a value it could not convert)
        if message and node_class.still_accepted(name, value):
            message = None
        if message:
            hint = node_class.choice_hint(name, value)
            problems[name] = f"{display}: {name} {message}" + (f". {hint}" if hint else "")
        else:
            checked[name] = value
    for name, message in node_class.input_rules(checked).items():
        problems.setdefault(name, message if message.startswith(display) else f"{display}: {message}")
    return problems


NOT_CHECKABLE = object()


def value_problem(kind, options, value):
    """What is wrong with one widget value (the words after the input's name), None when nothing is, or
    ``NOT_CHECKABLE`` for a value ComfyUI itself reports (not a number where a number is declared)."""
    if value is LINKED:
        return None  # known only when the linked node has run
    if isinstance(kind, list):  # a V1 dropdown
        kind, options = "COMBO", {**options, "options": kind}
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return NOT_CHECKABLE  # ComfyUI: "Failed to convert an input value to a INT value"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}: set a number between {options.get('min')} and {options.get('max')}"
        low, high = options.get("min"), options.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            return f"must be between {low} and {high}, got {value}"
        return None
    if kind == "COMBO":
        choices = options.get("options") or []
        if value in choices:
            return None
        return f"{value!r} is not one of the choices: pick one of {listed(choices)}"
    if kind == "STRING" and not isinstance(value, str):
        return NOT_CHECKABLE
    return None


def listed(choices):
    shown = ", ".join(repr(c) for c in list(choices)[:MAX_LISTED_OPTIONS])
    more = len(choices) - MAX_LISTED_OPTIONS
    return shown + (f" (and {more} more)" if more > 0 else "")


# ---------------------------------------------------------------------------- ComfyUI's report, narrowed
def attribute_to_inputs(execution, node_classes):
    """Wrap ``execution.validate_inputs`` (ComfyUI's per-node validation) so that the failed custom checks
    of ``node_classes`` are reported once per input concerned. Safe to call more than once."""
    original = getattr(execution, "validate_inputs", None)
    if original is None or not inspect.iscoroutinefunction(original) or getattr(original, "magi1_narrowed", False):
        return False
    ours = {node.GET_SCHEMA().node_id: node for node in node_classes}

    @functools.wraps(original)
    async def validate_inputs(prompt_id, prompt, item, validated, *args, **kwargs):
        result = await original(prompt_id, prompt, item, validated, *args, **kwargs)
        try:
            node_class = ours.get(prompt[item]["class_type"])
            if node_class is None or result[0] is not False:
                return result
            narrowed = (False, narrowed_errors(node_class, prompt[item]["inputs"], result[1]), *result[2:])
        except Exception:  # never let the pack break ComfyUI's validation
            logging.debug("MAGI-1: could not narrow the validation errors of node %s", item, exc_info=True)
            return result
        validated[item] = narrowed
        return narrowed

    validate_inputs.magi1_narrowed = True
    execution.validate_inputs = validate_inputs
    return True


def narrowed_errors(node_class, inputs, errors):
    """ComfyUI's errors of one node with its custom-check errors (one per input read, each with every
    message) replaced by one error per problem, on its own input."""
    custom = [e for e in errors if e.get("type") == "custom_validation_failed"]
    if not custom:
        return errors
    values = {name: (LINKED if isinstance(value, list) else value) for name, value in inputs.items()}
    problems = input_problems(node_class, values)
    if not problems:
        return errors
    kept = [e for e in errors if e.get("type") != "custom_validation_failed"]
    return kept + [{"type": "custom_validation_failed", "message": "Custom validation failed for node",
                    "details": f"{name} - {message}", "extra_info": {"input_name": name}}
                   for name, message in problems.items()]


def output_prefix_problems(values, name="filename_prefix", example="video/MAGI1"):
    """``{name: message}`` unless ``values[name]`` names a file inside ComfyUI's output folder."""
    prefix = values.get(name)
    if prefix is None:
        return {}
    output = os.path.abspath(folder_paths.get_output_directory())
    target = os.path.abspath(os.path.join(output, prefix))
    try:
        inside = os.path.commonpath([output, target]) == output and target != output
    except ValueError:  # another Windows drive
        inside = False
    if not prefix.strip() or not inside:
        return {name: f"{name} must name a file inside ComfyUI's output folder, got {prefix!r}: e.g. {example}"}
    return {}
