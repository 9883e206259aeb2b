import sys
from taskcore import Client


def inc(x):
    return x + 1


def add(x, y):
    return x + y


client = Client(sys.argv[1])
a = client.map(inc, range(100))
b = client.map(inc, a)
total = client.submit(sum, b)
print(total.result())
x = client.submit(add, client.submit(inc, 1), 10)
print(x.result(), x.status)
print(client.gather({"a": a[0], "b": [b[0], b[1]]}))
f = client.submit(lambda: 1 / 0)
try:
    f.result()
except ZeroDivisionError:
    print("ZeroDivisionError", f.status)
print(len(client.scheduler_info()["workers"]), "workers")
client.close()

# expect: 5150
# expect: 12 finished
# expect: {'a': 1, 'b': [2, 3]}
# expect: ZeroDivisionError error
# expect: 3 workers
