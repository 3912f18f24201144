"""A hypernetwork's structure as A1111 describes it in a file's string keys (layer structure, activation, layer
norm, dropout, weight initialisation), the layer layout A1111 builds from it, and what is wrong with a setting.
Light on purpose (no torch): config checks use it. The modules themselves are in hypernetwork.py."""
from __future__ import annotations

from dataclasses import dataclass

# A1111's activation names: its own table (linear = none; swish = Hardswish, not SiLU) and every class of
# torch.nn.modules.activation under its lower-cased name, instantiated without arguments. Left out: the three
# A1111 lists but cannot build a working layer from (glu halves the width, multiheadattention and threshold
# need arguments). tests/networks/test_hypernetwork.py checks this list against the installed torch.
ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "celu", "gelu", "hardshrink",
               "hardsigmoid", "hardswish", "hardtanh", "logsigmoid", "logsoftmax", "mish", "prelu", "relu6",
               "rrelu", "selu", "silu", "softmax", "softmax2d", "softmin", "softplus", "softshrink", "softsign",
               "tanhshrink")
# what ComfyUI's HypernetworkLoader can rebuild (anything else it skips with "Unsupported Hypernetwork format")
COMFY_ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish")
WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
A1111_SIZES = (768, 320, 640, 1280)  # A1111's default enable_sizes: SD1's text width, then its attention widths


def a1111_dropout_structure(layer_structure: list[float], use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """A1111's parse_dropout_structure: no dropout, or 0.3 after every hidden layer but the last one (which
    gets it only with last_layer_dropout); never after the input or the output."""
    if not use_dropout:
        return [0.0] * len(layer_structure)
    return [0.0] + [0.3] * (len(layer_structure) - 3) + [0.3 if last_layer_dropout else 0.0, 0.0]


@dataclass(frozen=True)
class HypernetworkSpec:
    """The structure every width's two MLPs share (a file's string keys, A1111's names)."""

    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation_func: str = "linear"
    weight_initialization: str = "Normal"
    is_layer_norm: bool = False
    use_dropout: bool = False
    dropout_structure: tuple[float, ...] = (0.0, 0.0, 0.0)
    activate_output: bool = False

    @property
    def last_layer_dropout(self) -> bool:
        """What A1111 writes: whether the last hidden layer has dropout."""
        return len(self.dropout_structure) >= 2 and self.dropout_structure[-2] != 0

    def layout(self) -> list[str]:
        """The modules of A1111's nn.Sequential in order ("linear", "activation", "layer_norm", "dropout"): a
        module's index is its key's number (`linear.<index>.weight`), so this fixes the file's key names."""
        modules, last = [], len(self.layer_structure) - 2
        for i in range(len(self.layer_structure) - 1):
            modules.append("linear")
            if self.activation_func != "linear" and (i < last or self.activate_output):
                modules.append("activation")
            if self.is_layer_norm:
                modules.append("layer_norm")
            if self.dropout_structure[i + 1] > 0:
                modules.append("dropout")
        return modules

    def parameter_count(self, width: int) -> int:
        """Trained values of one width's pair of MLPs (key and value)."""
        widths = [int(width * value) for value in self.layer_structure]
        count, index = 0, -1
        for kind in self.layout():
            if kind == "linear":
                index += 1
                count += widths[index] * widths[index + 1] + widths[index + 1]
            elif kind == "layer_norm":
                count += 2 * widths[index + 1]
            elif kind == "activation" and self.activation_func == "prelu":
                count += 1  # PReLU's learnt slope
        return 2 * count

    def describe(self) -> str:
        structure = ", ".join(f"{v:g}" for v in self.layer_structure)
        extras = [f"activation {self.activation_func}" + (" (also after the output)" if self.activate_output else ""),
                  f"init {self.weight_initialization}"]
        if self.is_layer_norm:
            extras.append("layer norm")
        if any(self.dropout_structure):
            extras.append("dropout " + ", ".join(f"{v:g}" for v in self.dropout_structure))
        return f"layer structure [{structure}], " + ", ".join(extras)

    def comfy_notes(self) -> list[str]:
        """Where ComfyUI's HypernetworkLoader would render this structure differently from A1111 (or not at all)."""
        notes = []
        if self.activation_func not in COMFY_ACTIVATIONS:
            notes.append(f"activation {self.activation_func!r} loads in A1111 but ComfyUI's HypernetworkLoader "
                         f"skips it (it knows {', '.join(COMFY_ACTIVATIONS)})")
        elif self.is_layer_norm and self.activation_func != "linear":
            notes.append("layer norm with an activation: ComfyUI adds the activation after the last layer too, "
                         "so it renders this network differently from A1111")
        if any(v not in (0, 0.3) for v in self.dropout_structure):
            notes.append("ComfyUI always uses dropout 0.3, whatever dropout_structure says (only training differs)")
        return notes


def structure_problems(layer_structure: list[float], dropout_structure: list[float] | None, use_dropout: bool,
                       activation_func: str, weight_initialization: str, section: str = "hypernetwork") -> list[str]:
    """One line per bad structure setting, naming its key."""
    problems = []
    if len(layer_structure) < 2 or layer_structure[0] != 1 or layer_structure[-1] != 1:
        problems.append(f"{section}.layer_structure = {list(layer_structure)}: it must start and end with 1 (the "
                        "widths are multiples of the context width, and the output replaces the input), e.g. "
                        "[1, 2, 1]")
    elif any(v <= 0 for v in layer_structure):
        problems.append(f"{section}.layer_structure = {list(layer_structure)}: every width multiple must be above 0")
    if activation_func not in ACTIVATIONS:
        problems.append(f"{section}.activation_func = {activation_func!r} is not an activation A1111 knows; use one "
                        f"of: {', '.join(ACTIVATIONS)}")
    if weight_initialization not in WEIGHT_INITS:
        problems.append(f"{section}.weight_initialization = {weight_initialization!r}: use one of "
                        f"{', '.join(WEIGHT_INITS)} (A1111's names)")
    if dropout_structure:
        problems += _dropout_problems(list(layer_structure), list(dropout_structure), use_dropout, section)
    return problems


def _dropout_problems(layers: list[float], dropout: list[float], use_dropout: bool, section: str) -> list[str]:
    key = f"{section}.dropout_structure = {dropout}"
    if len(dropout) != len(layers):
        return [f"{key}: it needs one value per layer_structure entry ({len(layers)})"]
    if dropout[0] != 0 or dropout[-1] != 0:
        return [f"{key}: the first and last values must be 0 (no dropout on the input or the output)"]
    if any(not 0 <= v < 1 for v in dropout):
        return [f"{key}: every value must be at least 0 and below 1"]
    if any(dropout) and not use_dropout:
        return [f"{key} asks for dropout but {section}.use_dropout = false: set use_dropout = true or use zeros"]
    return []


def default_sizes(context_dim: int | None, attention_widths: tuple[int, ...] | list[int]) -> list[int]:
    """A1111's enable_sizes for a model: its text (cross-attention) width, then its attention widths
    (768, 320, 640, 1280 on SD 1.x; 1024, 320, 640, 1280 on SD 2.x)."""
    sizes = [context_dim] if context_dim else []
    return sizes + [width for width in sorted(attention_widths) if width not in sizes]


def width_problem(what: str, widths: list[int], context_dim: int | None, attention_widths: tuple[int, ...],
                  label: str) -> str | None:
    """None when a hypernetwork with modules for `widths` fits a model; else why not. Refused: a network with
    modules for widths the model lacks and none for its text width (it was made for another family)."""
    known = default_sizes(context_dim, attention_widths)
    foreign = [w for w in widths if w not in known]
    if foreign and context_dim not in widths:
        return (f"{what} has modules for widths {', '.join(map(str, widths))}, but this {label} model's text "
                f"width is {context_dim} and its attention widths {', '.join(map(str, attention_widths))}: it was "
                "made for another model family")
    return None
