import sys
from taskcore import Client, get_client, rejoin, secede


def fib(n):
    if n < 2:
        return n
    client = get_client()
    a = client.submit(fib, n - 1)
    b = client.submit(fib, n - 2)
    secede()
    a, b = client.gather([a, b])
    rejoin()
    return a + b


client = Client(sys.argv[1])
print(client.submit(fib, 8).result())
client.close()

# expect: 21
