from keye.synthetic.manifest import main

main()
