import sys
from taskcore import Client, Variable, fire_and_forget


def record(x):
    Variable("fired").set(x)
    return x


client = Client(sys.argv[1])
fire_and_forget(client.submit(record, 42))
print(Variable("fired").get(timeout=10))
client.close()

# expect: 42
