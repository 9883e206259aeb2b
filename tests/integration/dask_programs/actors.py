import sys
from taskcore import Client


class Counter:
    n = 0

    def __init__(self):
        self.n = 0

    def increment(self):
        self.n += 1
        return self.n

    def add(self, x):
        self.n += x
        return self.n


def use(counter):
    return counter.add(10).result()


client = Client(sys.argv[1])
future = client.submit(Counter, actor=True)
counter = future.result()
print(counter.increment().result())
print([counter.increment().result() for _ in range(3)])
print(client.submit(use, counter).result(), counter.n)
client.close()

# expect: 1
# expect: [2, 3, 4]
# expect: 14 14
