import os
import sys
import tempfile
from taskcore import Client


def use_helper(x):
    import api2_prog_helper
    return api2_prog_helper.double(x)


client = Client(sys.argv[1])
d = tempfile.mkdtemp()
path = os.path.join(d, "api2_prog_helper.py")
with open(path, "w") as f:
    f.write("def double(x):\n    return 2 * x\n")
client.upload_file(path)
print(client.gather(client.map(use_helper, range(4))))
client.close()

# expect: [0, 2, 4, 6]
