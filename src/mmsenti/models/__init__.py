"""Every registered model. Importing this package imports each model module, whose ``@MODELS.register``
decorators fill :data:`mmsenti.registry.MODELS` (as ``timm.models`` does): a module that fails to import makes
``import mmsenti.models`` fail with its error.
"""

from mmsenti.models import baselines, rahp  # noqa: F401
from mmsenti.models.infig import model as infig_model  # noqa: F401
