import sys
from taskcore import Client, Event, Lock, Queue, Semaphore, Variable


def producer(n):
    q = Queue("jobs")
    for i in range(n):
        q.put(i)
    return n


def guarded_increment(i):
    with Lock("counter"):
        v = Variable("count")
        v.set(v.get() + 1)
    return i


def limited(i):
    with Semaphore(max_leases=2, name="api"):
        return i


def waiter():
    return Event("go").wait(timeout=10)


if __name__ == "__main__":
    client = Client(sys.argv[1])
    client.submit(producer, 5).result()
    q = Queue("jobs")
    print("queue", q.qsize(), q.get(batch=True))
    Variable("count").set(0)
    client.gather(client.map(guarded_increment, range(20)))
    print("count", Variable("count").get())
    print("semaphore", sum(client.gather(client.map(limited, range(10)))))
    w = client.submit(waiter)
    Event("go").set()
    print("event", w.result())
    v = Variable("future")
    v.set(client.submit(sum, [1, 2, 3]))
    print("variable", v.get().result())
    client.close()

# expect: queue 5 [0, 1, 2, 3, 4]
# expect: count 20
# expect: semaphore 45
# expect: event True
# expect: variable 6
