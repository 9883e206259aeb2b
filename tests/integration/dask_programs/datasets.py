import sys
from taskcore import Client

c1 = Client(sys.argv[1])
x = c1.submit(lambda: list(range(5)))
c1.publish_dataset(shared=x)
c2 = Client(sys.argv[1], set_as_default=False)
print(c2.list_datasets())
print(c2.get_dataset("shared").result())
c1.unpublish_dataset("shared")
print(c2.list_datasets())
c2.close()
c1.close()

# expect: ['shared']
# expect: [0, 1, 2, 3, 4]
# expect: []
