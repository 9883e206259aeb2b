import sys
import numpy as np
from taskcore import Client


def total(arr):
    return float(arr.sum())


with Client(sys.argv[1]) as client:
    data = np.arange(1_000_000, dtype="float64")
    [future] = client.scatter([data])
    print(client.submit(total, future).result())
    big = client.scatter(data, broadcast=True)
    n_workers = len(client.scheduler_info()["workers"])
    print(len(client.who_has([big])[big.key]) == n_workers)
    d = client.scatter({"x": 1, "y": 2})
    print(client.submit(lambda a, b: a + b, d["x"], d["y"]).result())

# expect: 499999500000.0
# expect: True
# expect: 3
