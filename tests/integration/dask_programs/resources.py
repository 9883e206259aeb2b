import sys
import time
from taskcore import Client, get_worker


def heavy(i):
    time.sleep(0.05)
    return get_worker().address


client = Client(sys.argv[1])
futures = client.map(heavy, range(6), resources={"BIG": 1})
addresses = client.gather(futures)
with_big = [w for w, info in client.scheduler_info()["workers"].items()
            if info["resources"].get("BIG")]
print(len(with_big), set(addresses) == set(with_big))
client.close()

# expect: 1 True
