import sys
from taskcore import Client, as_completed, wait


def square(x):
    return x ** 2


def main():
    client = Client(sys.argv[1])
    futures = client.map(square, range(10))
    total = 0
    for future in as_completed(futures):
        total += future.result()
    print("total", total)
    done, not_done = wait(futures)
    print("done", len(done), "pending", len(not_done))
    results = sorted(r for _, r in as_completed(futures, with_results=True))
    print("results", results[:4])
    client.close()


if __name__ == "__main__":
    main()

# expect: total 285
# expect: done 10 pending 0
# expect: results [0, 1, 4, 9]
