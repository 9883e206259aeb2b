import sys
from concurrent.futures import as_completed
from taskcore import Client


def cube(x):
    return x ** 3


client = Client(sys.argv[1])
with client.get_executor() as ex:
    futures = [ex.submit(cube, i) for i in range(5)]
    print(sorted(f.result() for f in as_completed(futures)))
    print(list(ex.map(cube, [1, 2, 3])))
client.close()

# expect: [0, 1, 8, 27, 64]
# expect: [1, 8, 27]
