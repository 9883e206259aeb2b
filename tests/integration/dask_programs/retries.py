import sys
from taskcore import Client, Variable


def flaky():
    v = Variable("attempts")
    n = v.get() + 1
    v.set(n)
    if n < 3:
        raise RuntimeError(f"attempt {n} failed")
    return f"succeeded on attempt {n}"


client = Client(sys.argv[1])
Variable("attempts").set(0)
print(client.submit(flaky, retries=3, pure=False).result())
Variable("attempts").set(0)
f = client.submit(flaky, retries=1, pure=False)
try:
    f.result()
except RuntimeError as e:
    print(e)
client.close()

# expect: succeeded on attempt 3
# expect: attempt 2 failed
