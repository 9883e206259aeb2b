import sys
from taskcore import Client, Pub, Sub


def publish(n):
    pub = Pub("updates")
    for i in range(n):
        pub.put({"i": i})
    return n


client = Client(sys.argv[1])
sub = Sub("updates")
client.submit(publish, 3).result()
print([sub.get(timeout=10)["i"] for _ in range(3)])
try:
    sub.get(timeout=0.1)
except TimeoutError:
    print("no more messages")
client.close()

# expect: [0, 1, 2]
# expect: no more messages
