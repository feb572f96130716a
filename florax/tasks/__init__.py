"""Tasks: one per objective family. Built-in tasks register on import."""
from florax.tasks.registry import build, register  # noqa: F401
from florax.tasks import unicl  # noqa: F401,E402
from florax.tasks import eva_mim  # noqa: F401,E402
from florax.tasks import classify  # noqa: F401,E402
from florax.tasks import vqkd  # noqa: F401,E402
from florax.tasks import beit3_mdm  # noqa: F401,E402
from florax.tasks import beit3_vqa  # noqa: F401,E402
from florax.tasks import beit3_caption  # noqa: F401,E402
from florax.tasks import beit3_retrieval  # noqa: F401,E402
from florax.tasks import flava  # noqa: F401,E402
from florax.tasks import flava_classify  # noqa: F401,E402
from florax.tasks import meter  # noqa: F401,E402
from florax.tasks import video  # noqa: F401,E402
from florax.tasks import detection  # noqa: F401,E402
