"""Methods as presets of the one template (see template.py and presets.py)."""
from visrep.methods.presets import METHODS, MethodPreset
from visrep.methods.template import Template, TemplateOutput, build_template

__all__ = ["METHODS", "MethodPreset", "Template", "TemplateOutput", "build_template"]
