import sys
import dask.array as da
from taskcore import Client, wait

if __name__ == "__main__":
    client = Client(sys.argv[1])
    x = da.random.default_rng(0).random((2000, 2000), chunks=(500, 500))
    y = (x + x.T).mean(axis=0)
    print(y.shape, round(float(y.sum().compute() / 2000), 1))
    x = x.persist()
    wait(x)
    print(len(client.who_has(x)))
    print(round(float(x.std().compute()), 2))
    f = client.compute(x.sum())
    print(round(f.result() / 4_000_000, 1))
    client.close()

# expect: (2000,) 1.0
# expect: 16
# expect: 0.29
# expect: 0.5
