"""Print every verse of one SWORD module as JSON lines ``{"ref": OSIS reference, "markup": ...}``.

Run by Debian's own ``python3`` (``clusterlm.data.bible`` starts it), never imported: the
``python3-sword`` binding is compiled for that interpreter, whatever Python runs clusterlm.
Exit status 3: the binding is missing; 4: the module is not installed.
"""

import json
import sys

try:
    import Sword  # type: ignore[import-not-found]
except ImportError:
    sys.exit(3)


def main(module_name: str) -> int:
    manager = Sword.SWMgr()  # kept referenced while the module is read: it owns the module
    module = manager.getModule(module_name)
    if module is None:
        return 4
    module.setKey(Sword.VerseKey("Gen 1:1"))
    out = sys.stdout
    # popError() is a one-character string: chr(0) while the key is still inside the text.
    while not ord(module.popError()):
        ref = Sword.VerseKey(module.getKeyText()).getOSISRef()
        out.write(json.dumps({"ref": ref, "markup": module.getRawEntry()}) + "\n")
        module.increment()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
